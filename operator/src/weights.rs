//! Weights, as pure functions of what the operator knows about each endpoint: [`weigh`]
//! applies a GrpcBackend's policy to its endpoints.
//!
//! - `Equal`: every usable endpoint gets [`FULL_WEIGHT`].
//! - `Static`: the Pod annotation `kubegrpc.io/weight` ([`static_weight`]).
//! - `LoadReport`: gRFC A58's `weighted_round_robin` weights from each backend's ORCA reports
//!   ([`LoadWeight`]), computed once by the operator for every client, each capped at
//!   [`MAX_TIMES_MEDIAN`] (4) times the lower median of the valid weights so that a backend
//!   cannot take the traffic by lying in its reports (one liar among n endpoints gets at most
//!   4 / (n + 3) of the requests), then scaled so that the mean is [`FULL_WEIGHT`] and
//!   published with hysteresis ([`publish_load_weights`]): a steady load makes no status
//!   writes.
//!
//! Slow start is the clients' (see the client crate): the status carries the full weight and
//! when the endpoint became usable, so a new endpoint costs one status write, not one per step.

use std::time::Duration;

use kubegrpc_crds::{FULL_WEIGHT, MAX_STATIC_WEIGHT};
use kubegrpc_orca::OrcaLoadReport;
use tokio::time::Instant;

/// A GrpcBackend's weighting policy, its settings read from a valid spec.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Policy {
    Equal,
    Static,
    LoadReport {
        settings: LoadSettings,
        /// How often backends are asked for a report: the weights are looked at again at
        /// least this often.
        report_interval: Duration,
    },
}

/// What the policies know of one endpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointFacts {
    /// Kubernetes-ready and Serving: `LoadReport` weighs these only.
    pub usable: bool,
    /// `Static`: the `kubegrpc.io/weight` annotation of the Pod behind the endpoint (`None`:
    /// no Pod, or no annotation).
    pub annotation: Option<String>,
    /// `LoadReport`: the endpoint's load reports so far, and when its prober started.
    pub load: LoadWeight,
    pub prober_started: Instant,
    /// The weight the status lists for the endpoint now, if it lists one above 0.
    pub published: Option<u32>,
}

/// The weights of a GrpcBackend's endpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    /// One per endpoint, in the order given. Endpoints a policy does not weigh get
    /// [`FULL_WEIGHT`] (what they would get were they usable).
    pub weights: Vec<u32>,
    /// `Static`: the endpoints whose annotation cannot be used (they get [`FULL_WEIGHT`]), by
    /// index, with why.
    pub invalid_annotations: Vec<(usize, String)>,
    /// The weights may change by themselves (new load reports, a blackout ending, a weight
    /// expiring): look again after this long.
    pub change_in: Option<Duration>,
}

/// The weights `policy` gives `endpoints` at `now`.
pub fn weigh(policy: &Policy, endpoints: &[EndpointFacts], now: Instant) -> Weights {
    let mut weights = Weights {
        weights: vec![FULL_WEIGHT; endpoints.len()],
        invalid_annotations: Vec::new(),
        change_in: None,
    };
    match policy {
        Policy::Equal => {}
        Policy::Static => {
            for (i, endpoint) in endpoints.iter().enumerate() {
                match static_weight(endpoint.annotation.as_deref()) {
                    Ok(weight) => weights.weights[i] = weight,
                    Err(why) => weights.invalid_annotations.push((i, why)),
                }
            }
        }
        Policy::LoadReport {
            settings,
            report_interval,
        } => {
            let usable: Vec<&EndpointFacts> = endpoints.iter().filter(|e| e.usable).collect();
            let current: Vec<Option<f64>> = usable.iter().map(|e| e.load.current(settings, now)).collect();
            let published: Vec<Option<u32>> = usable.iter().map(|e| e.published.filter(|w| *w > 0)).collect();
            // A prober younger than the expiration period that has no valid weight yet (the
            // operator restarted, or took over as leader) cannot have seen the published
            // weight expire: it stands until the prober has its own.
            let hold: Vec<bool> = usable
                .iter()
                .zip(&current)
                .map(|(e, current)| {
                    current.is_none()
                        && now.saturating_duration_since(e.prober_started) < settings.weight_expiration_period
                })
                .collect();
            let mut published_weights = publish_load_weights(&current, &published, &hold).into_iter();
            for (weight, endpoint) in weights.weights.iter_mut().zip(endpoints) {
                if endpoint.usable
                    && let Some(published) = published_weights.next()
                {
                    *weight = published;
                }
            }
            weights.change_in = endpoints
                .iter()
                .filter_map(|e| e.load.changes_in(settings, now))
                .chain([*report_interval])
                .min();
        }
    }
    weights
}

/// The weight a Pod's `kubegrpc.io/weight` annotation gives (absent: [`FULL_WEIGHT`]), or why
/// the value cannot be used.
pub fn static_weight(annotation: Option<&str>) -> Result<u32, String> {
    let Some(text) = annotation else {
        return Ok(FULL_WEIGHT);
    };
    match text.trim().parse::<u32>() {
        Ok(weight) if weight <= MAX_STATIC_WEIGHT => Ok(weight),
        _ => Err(format!(
            "{:?} is not a whole number from 0 to {MAX_STATIC_WEIGHT}",
            text.chars().take(64).collect::<String>()
        )),
    }
}

/// What one ORCA report says, as A58 reads it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadSample {
    /// Requests per second.
    pub qps: f64,
    /// Errors per second.
    pub eps: f64,
    /// `application_utilization` when above 0, else `cpu_utilization`.
    pub utilization: f64,
}

impl LoadSample {
    pub fn from_report(report: &OrcaLoadReport) -> Self {
        let utilization = if report.application_utilization > 0.0 {
            report.application_utilization
        } else {
            report.cpu_utilization
        };
        Self {
            qps: report.rps_fractional,
            eps: report.eps,
            utilization,
        }
    }

    /// A58: a report without load (no requests, or no utilization) says nothing about
    /// capacity and is ignored.
    fn is_empty(&self) -> bool {
        !(self.qps > 0.0 && self.utilization > 0.0 && self.qps.is_finite() && self.utilization.is_finite())
    }

    /// A58's weight: qps / (utilization + eps / qps x penalty).
    fn weight(&self, error_utilization_penalty: f64) -> f64 {
        let penalty = if self.eps.is_finite() && self.eps > 0.0 {
            self.eps / self.qps * error_utilization_penalty
        } else {
            0.0
        };
        self.qps / (self.utilization + penalty)
    }
}

/// gRFC A58's per-endpoint weight state, fed by its reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadWeight {
    last: Option<LoadSample>,
    /// Since when non-empty reports have been arriving without a gap longer than the
    /// expiration period (the blackout runs from here).
    non_empty_since: Option<Instant>,
    last_updated: Option<Instant>,
}

/// A58's settings, from the GrpcBackend spec.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadSettings {
    pub blackout_period: Duration,
    pub weight_expiration_period: Duration,
    pub error_utilization_penalty: f64,
}

impl LoadWeight {
    /// A report arrived at `now`.
    pub fn update(&mut self, sample: LoadSample, expiration: Duration, now: Instant) {
        if sample.is_empty() {
            return;
        }
        let expired = self
            .last_updated
            .is_none_or(|last| now.saturating_duration_since(last) >= expiration);
        if expired {
            self.non_empty_since = Some(now);
        }
        self.last = Some(sample);
        self.last_updated = Some(now);
    }

    /// The load stream started over (a new connection): A58 restarts the blackout, since a
    /// reconnected backend may well be a restarted one.
    pub fn restart(&mut self) {
        *self = Self::default();
    }

    /// The weight to use at `now`: `None` before the first report, during the blackout and
    /// after the reports stopped for the expiration period.
    pub fn current(&self, settings: &LoadSettings, now: Instant) -> Option<f64> {
        let (sample, since, updated) = (self.last?, self.non_empty_since?, self.last_updated?);
        if now.saturating_duration_since(updated) >= settings.weight_expiration_period {
            return None;
        }
        if now.saturating_duration_since(since) < settings.blackout_period {
            return None;
        }
        let weight = sample.weight(settings.error_utilization_penalty);
        (weight.is_finite() && weight > 0.0).then_some(weight)
    }

    /// When [`LoadWeight::current`] changes by itself next (the blackout ends or the weight
    /// expires), if it will.
    pub fn changes_in(&self, settings: &LoadSettings, now: Instant) -> Option<Duration> {
        let (since, updated) = (self.non_empty_since?, self.last_updated?);
        // Checked: an `Instant` plus a huge period panics on overflow, and such a period means
        // "never" here.
        let after =
            |from: Instant, period: Duration| from.checked_add(period).map(|at| at.saturating_duration_since(now));
        [
            after(since, settings.blackout_period),
            after(updated, settings.weight_expiration_period),
        ]
        .into_iter()
        .flatten()
        .filter(|d| !d.is_zero())
        .min()
    }
}

/// How far a new weight may drift from the published one, in percent, before it is published.
/// The weights come from measurements, which wobble by a few percent from report to report;
/// publishing every wobble would wake every client every report interval.
pub const HYSTERESIS_PERCENT: u32 = 10;

/// The weights to publish for the usable endpoints of one GrpcBackend under `LoadReport`.
///
/// `current[i]` is endpoint i's A58 weight (`None`: no valid weight), `published[i]` what the
/// status says now (`None`: not usable there), `hold[i]` whether a published weight without a
/// current one still stands (a restarted operator's prober has had no time for a valid weight:
/// the published one, from the previous operator's reports, is the best estimate; the mean
/// would cost two status writes and a spell of wrong weights per restart). A58 gives endpoints
/// without a valid weight the mean of the others; each valid weight is first capped at
/// [`MAX_TIMES_MEDIAN`] times the lower median of them ([`bounded_weights`]: a backend cannot
/// take the traffic by reporting a huge capacity), then the weights are scaled so that their
/// mean is [`FULL_WEIGHT`] (a resolution of 1%), and an endpoint keeps its published weight
/// while the new one is within [`HYSTERESIS_PERCENT`] of it.
pub fn publish_load_weights(current: &[Option<f64>], published: &[Option<u32>], hold: &[bool]) -> Vec<u32> {
    assert_eq!(current.len(), published.len(), "one published weight per endpoint");
    assert_eq!(current.len(), hold.len(), "one hold per endpoint");
    let current = bounded_weights(current);
    // The schema admits any u32 in the status; this policy never publishes 0 or more than
    // MAX_STATIC_WEIGHT, so a value outside that range was not written by it and is bounded
    // like the rest before it is held or compared.
    let published: Vec<Option<u32>> = published
        .iter()
        .map(|w| w.filter(|w| *w > 0).map(|w| w.min(MAX_STATIC_WEIGHT)))
        .collect();
    let held = |i: usize| current[i].is_none() && hold[i] && published[i].is_some();
    let valid: Vec<f64> = current.iter().flatten().copied().collect();
    let mean = (!valid.is_empty()).then(|| valid.iter().sum::<f64>() / valid.len() as f64);
    // Raw weights become published ones by a factor: normally the one that makes their mean
    // FULL_WEIGHT; while some weights are held, the one the valid endpoints were published at,
    // so that both kinds stay comparable.
    let (published_sum, raw_sum) = (0..current.len())
        .filter_map(|i| Some((f64::from(published[i]?), current[i]?)))
        .fold((0.0, 0.0), |(p, r), (pi, ri)| (p + pi, r + ri));
    let held_factor = Some(published_sum / raw_sum).filter(|f| raw_sum > 0.0 && f.is_finite());
    let factor = match (mean, held_factor) {
        (Some(_), Some(held_factor)) if (0..current.len()).any(held) => Some(held_factor),
        (Some(mean), _) => Some(f64::from(FULL_WEIGHT) / mean),
        (None, _) => None,
    };
    (0..current.len())
        .map(|i| {
            if held(i) {
                return published[i].unwrap_or(FULL_WEIGHT);
            }
            let (Some(factor), Some(mean)) = (factor, mean) else {
                return FULL_WEIGHT;
            };
            // `as` saturates (and takes NaN to 0): the clamp bounds whatever came out.
            let new = ((current[i].unwrap_or(mean) * factor).round() as u32).clamp(1, MAX_STATIC_WEIGHT);
            // In u64: `old` may be as large as u32::MAX.
            let within =
                |old: u32| u64::from(new.abs_diff(old)) * 100 <= u64::from(old) * u64::from(HYSTERESIS_PERCENT);
            match published[i] {
                Some(old) if within(old) => old,
                _ => new,
            }
        })
        .collect()
}

/// How many times the lower median of the valid weights one endpoint's weight may be; above
/// it, it is that (see [`bounded_weights`]).
pub const MAX_TIMES_MEDIAN: f64 = 4.0;

/// The valid weights of `current` (finite and above 0; anything else is `None`, no valid
/// weight) relative to their lower median, each at most [`MAX_TIMES_MEDIAN`].
///
/// A58 trusts every report: a backend claiming qps 1e12 at utilization 1e-9 weighs 1e21 and
/// draws nearly every request. The cap bounds what lying can win: at most what an honest
/// backend 4x the typical one gets, so one liar among n endpoints takes at most 4 / (n + 3)
/// of the requests (80% of 2, 57% of 4, 31% of 10) while the honest ones keep their ratios.
/// - The lower median (the ((n - 1) / 2)-th smallest) stays an honest backend's weight while
///   fewer than half of them inflate their weight (one of two included, which the mean of the
///   middle pair would not be), and lying low only gives one's own traffic away.
/// - 4x leaves the weights a Deployment's Pods legitimately reach alone: same resource requests,
///   different nodes or neighbours make 1.5-3x; 1:1:2 and 3:3:1 capacities are untouched.
/// - Before scaling, so that endpoints without a valid weight get the mean of bounded weights,
///   and the sums stay small whatever was reported (1e300s cannot overflow to infinity).
fn bounded_weights(current: &[Option<f64>]) -> Vec<Option<f64>> {
    let valid = |w: &Option<f64>| w.filter(|w| w.is_finite() && *w > 0.0);
    let mut sorted: Vec<f64> = current.iter().filter_map(valid).collect();
    sorted.sort_by(f64::total_cmp);
    let Some(&median) = sorted.get(sorted.len().saturating_sub(1) / 2) else {
        return vec![None; current.len()];
    };
    // Both finite and above 0: the quotient is not NaN (an overflow to infinity is capped).
    current
        .iter()
        .map(|w| valid(w).map(|w| (w / median).min(MAX_TIMES_MEDIAN)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_static_weight_is_read_from_the_annotation_and_bad_values_are_refused() {
        assert_eq!(static_weight(None), Ok(FULL_WEIGHT));
        assert_eq!(static_weight(Some("3")), Ok(3));
        assert_eq!(static_weight(Some(" 0 ")), Ok(0));
        assert_eq!(static_weight(Some("10000")), Ok(10_000));
        for bad in ["10001", "-1", "1.5", "heavy", ""] {
            let error = static_weight(Some(bad)).unwrap_err();
            assert!(error.contains("whole number from 0 to 10000"), "{error}");
        }
    }

    fn facts(usable: bool, annotation: Option<&str>) -> EndpointFacts {
        EndpointFacts {
            usable,
            annotation: annotation.map(String::from),
            load: LoadWeight::default(),
            prober_started: Instant::now(),
            published: None,
        }
    }

    #[test]
    fn equal_gives_every_endpoint_the_full_weight_whatever_its_pod_says() {
        let endpoints = [facts(true, Some("3")), facts(false, Some("heavy")), facts(true, None)];
        let weights = weigh(&Policy::Equal, &endpoints, Instant::now());
        assert_eq!(weights.weights, [FULL_WEIGHT; 3]);
        assert!(weights.invalid_annotations.is_empty());
        assert_eq!(weights.change_in, None);
    }

    #[test]
    fn static_weighs_every_endpoint_by_its_pods_annotation_and_names_the_bad_ones() {
        let endpoints = [
            facts(true, Some("1")),
            facts(false, Some("3")),
            facts(true, None),
            facts(true, Some("heavy")),
        ];
        let weights = weigh(&Policy::Static, &endpoints, Instant::now());
        assert_eq!(weights.weights, [1, 3, FULL_WEIGHT, FULL_WEIGHT]);
        assert_eq!(weights.invalid_annotations.len(), 1);
        let (index, why) = &weights.invalid_annotations[0];
        assert_eq!(*index, 3);
        assert!(why.contains("\"heavy\" is not a whole number"), "{why}");
        assert_eq!(weights.change_in, None);
    }

    #[tokio::test(start_paused = true)]
    async fn load_report_weighs_usable_endpoints_from_their_reports_and_says_when_to_look_again() {
        let start = Instant::now();
        let policy = Policy::LoadReport {
            settings: SETTINGS,
            report_interval: Duration::from_secs(30),
        };
        let reporting = |usable: bool, utilization: f64| {
            let mut load = LoadWeight::default();
            load.update(
                sample(100.0, 0.0, utilization),
                SETTINGS.weight_expiration_period,
                start,
            );
            EndpointFacts {
                load,
                ..facts(usable, Some("7"))
            }
        };
        // Weights 200 and 400 on the usable ones; the third is not usable: not weighed.
        let endpoints = [reporting(true, 0.5), reporting(true, 0.25), reporting(false, 0.1)];

        let in_blackout = weigh(&policy, &endpoints, start + Duration::from_secs(4));
        assert_eq!(in_blackout.weights, [FULL_WEIGHT; 3], "no valid weight yet: the mean");
        assert_eq!(
            in_blackout.change_in,
            Some(Duration::from_secs(6)),
            "when the blackout ends"
        );

        let after = weigh(&policy, &endpoints, start + Duration::from_secs(10));
        assert_eq!(after.weights, [67, 133, FULL_WEIGHT]);
        assert!(after.invalid_annotations.is_empty(), "annotations are Static's only");
        assert_eq!(after.change_in, Some(Duration::from_secs(30)), "the report interval");
    }

    #[tokio::test(start_paused = true)]
    async fn load_report_holds_a_published_weight_while_a_young_prober_has_none() {
        let policy = Policy::LoadReport {
            settings: SETTINGS,
            report_interval: Duration::from_secs(10),
        };
        let published = |weight| EndpointFacts {
            published: Some(weight),
            ..facts(true, None)
        };
        let endpoints = [published(50), published(150)];
        let young = weigh(&policy, &endpoints, Instant::now() + Duration::from_secs(179));
        assert_eq!(young.weights, [50, 150]);
        let old = weigh(&policy, &endpoints, Instant::now() + Duration::from_secs(180));
        assert_eq!(old.weights, [FULL_WEIGHT; 2], "expired: the reports stopped");
    }

    const SETTINGS: LoadSettings = LoadSettings {
        blackout_period: Duration::from_secs(10),
        weight_expiration_period: Duration::from_secs(180),
        error_utilization_penalty: 1.0,
    };

    fn sample(qps: f64, eps: f64, utilization: f64) -> LoadSample {
        LoadSample { qps, eps, utilization }
    }

    #[test]
    fn the_a58_formula_divides_qps_by_utilization_plus_the_error_penalty() {
        assert_eq!(sample(100.0, 0.0, 0.5).weight(1.0), 200.0);
        // 10% errors at penalty 1 count as 0.1 utilization.
        assert!((sample(100.0, 10.0, 0.4).weight(1.0) - 200.0).abs() < 1e-9);
        assert!((sample(100.0, 10.0, 0.4).weight(2.0) - 100.0 / 0.6).abs() < 1e-9);
        assert_eq!(sample(100.0, 10.0, 0.5).weight(0.0), 200.0);
    }

    #[test]
    fn application_utilization_is_preferred_over_cpu() {
        let report = OrcaLoadReport {
            cpu_utilization: 0.9,
            application_utilization: 0.3,
            rps_fractional: 30.0,
            ..Default::default()
        };
        assert_eq!(LoadSample::from_report(&report).utilization, 0.3);
        let cpu_only = OrcaLoadReport {
            cpu_utilization: 0.9,
            rps_fractional: 30.0,
            ..Default::default()
        };
        assert_eq!(LoadSample::from_report(&cpu_only).utilization, 0.9);
    }

    #[tokio::test(start_paused = true)]
    async fn a_weight_counts_only_after_the_blackout_and_expires_when_reports_stop() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut weight = LoadWeight::default();
        assert_eq!(weight.current(&SETTINGS, at(0)), None, "no report yet");
        weight.update(sample(100.0, 0.0, 0.5), SETTINGS.weight_expiration_period, at(0));
        assert_eq!(weight.current(&SETTINGS, at(9)), None, "in the blackout");
        assert_eq!(weight.changes_in(&SETTINGS, at(9)), Some(Duration::from_secs(1)));
        assert_eq!(weight.current(&SETTINGS, at(10)), Some(200.0));
        weight.update(sample(100.0, 0.0, 0.25), SETTINGS.weight_expiration_period, at(20));
        assert_eq!(
            weight.current(&SETTINGS, at(21)),
            Some(400.0),
            "the latest report counts"
        );
        assert_eq!(weight.changes_in(&SETTINGS, at(21)), Some(Duration::from_secs(179)));
        assert_eq!(weight.current(&SETTINGS, at(199)), Some(400.0));
        assert_eq!(
            weight.current(&SETTINGS, at(200)),
            None,
            "expired 3 min after the last report"
        );
        // Reports resume: the blackout starts over.
        weight.update(sample(100.0, 0.0, 0.5), SETTINGS.weight_expiration_period, at(300));
        assert_eq!(weight.current(&SETTINGS, at(305)), None);
        assert_eq!(weight.current(&SETTINGS, at(310)), Some(200.0));
    }

    #[tokio::test(start_paused = true)]
    async fn empty_reports_are_ignored_and_a_restart_begins_a_new_blackout() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut weight = LoadWeight::default();
        weight.update(sample(0.0, 0.0, 0.5), SETTINGS.weight_expiration_period, at(0));
        weight.update(sample(10.0, 0.0, 0.0), SETTINGS.weight_expiration_period, at(0));
        weight.update(sample(f64::NAN, 0.0, 0.5), SETTINGS.weight_expiration_period, at(0));
        assert_eq!(weight, LoadWeight::default(), "no load, no information");
        weight.update(sample(10.0, 0.0, 0.5), SETTINGS.weight_expiration_period, at(0));
        assert_eq!(weight.current(&SETTINGS, at(11)), Some(20.0));
        weight.restart();
        weight.update(sample(10.0, 0.0, 0.5), SETTINGS.weight_expiration_period, at(12));
        assert_eq!(weight.current(&SETTINGS, at(13)), None);
    }

    #[test]
    fn published_weights_have_mean_100_and_endpoints_without_reports_get_the_mean() {
        let weights = publish_load_weights(&[Some(100.0), Some(100.0), Some(200.0), None], &[None; 4], &[false; 4]);
        assert_eq!(weights, [75, 75, 150, 100]);
        assert_eq!(
            publish_load_weights(&[None, None], &[Some(75), Some(150)], &[false; 2]),
            [100, 100],
            "expired: the mean"
        );
        assert_eq!(publish_load_weights(&[], &[], &[]), Vec::<u32>::new());
        // Extreme ratios are bounded at 4x the lower median (see the liar below).
        assert_eq!(
            publish_load_weights(&[Some(1e-9), Some(1e9)], &[None; 2], &[false; 2]),
            [40, 160]
        );
    }

    #[test]
    fn a_weight_within_the_hysteresis_keeps_its_published_value() {
        let published = [Some(75), Some(75), Some(150)];
        // A few percent of measurement noise: nothing changes.
        assert_eq!(
            publish_load_weights(&[Some(103.0), Some(97.0), Some(205.0)], &published, &[false; 3]),
            [75, 75, 150]
        );
        // A real change is published.
        assert_eq!(
            publish_load_weights(&[Some(100.0), Some(100.0), Some(100.0)], &published, &[false; 3]),
            [100, 100, 100]
        );
    }

    #[test]
    fn capacities_within_the_cap_keep_their_ratios() {
        let unbounded = |current: &[f64]| -> Vec<u32> {
            let mean = current.iter().sum::<f64>() / current.len() as f64;
            current.iter().map(|w| (w * 100.0 / mean).round() as u32).collect()
        };
        for capacities in [
            &[1.0, 1.0, 2.0][..],
            &[3.0, 3.0, 1.0],
            &[1.0, 4.0],
            &[2.0, 1.0, 8.0, 3.0],
        ] {
            let current: Vec<Option<f64>> = capacities.iter().map(|c| Some(c * 37.5)).collect();
            let n = current.len();
            assert_eq!(
                publish_load_weights(&current, &vec![None; n], &vec![false; n]),
                unbounded(capacities),
                "{capacities:?}"
            );
        }
        let same = |current: &[Option<f64>]| publish_load_weights(current, &[None; 3], &[false; 3]);
        assert_eq!(same(&[Some(100.0), Some(100.0), Some(200.0)]), [75, 75, 150]);
        assert_eq!(same(&[Some(3.0), Some(3.0), Some(1.0)]), [129, 129, 43]);
        assert_eq!(same(&[Some(300.4), Some(299.6), Some(100.0)]), [129, 128, 43]);
    }

    #[test]
    fn a_backend_lying_about_its_capacity_gets_at_most_four_times_the_median() {
        // Issue 18: qps 1e12 at utilization 1e-9 beside three honest backends got weight 400
        // and the honest ones 1 each.
        let liar = sample(1e12, 0.0, 1e-9).weight(1.0);
        let honest = sample(100.0, 0.0, 0.5).weight(1.0);
        for n in 2..=10 {
            let mut current = vec![Some(honest); n - 1];
            current.push(Some(liar));
            let weights = publish_load_weights(&current, &vec![None; n], &vec![false; n]);
            let (honest_weights, liar_weight) = weights.split_at(n - 1);
            assert!(
                honest_weights.iter().all(|w| *w == honest_weights[0]),
                "the honest ones keep equal weights: {weights:?}"
            );
            assert!(
                liar_weight[0] <= 4 * honest_weights[0] + 2,
                "at most 4x the median, with rounding: {weights:?}"
            );
            let share = f64::from(liar_weight[0]) / f64::from(weights.iter().sum::<u32>());
            assert!(
                share <= 4.0 / (n as f64 + 3.0) + 0.01,
                "{n} endpoints: the liar's share {share:.3} is at most 4 / (n + 3)"
            );
        }
        assert_eq!(
            publish_load_weights(
                &[Some(honest), Some(honest), Some(honest), Some(liar)],
                &[None; 4],
                &[false; 4]
            ),
            [57, 57, 57, 229]
        );
        // Two liars of four: the lower median is still an honest weight.
        assert_eq!(
            publish_load_weights(
                &[Some(honest), Some(honest), Some(liar), Some(liar)],
                &[None; 4],
                &[false; 4]
            ),
            [40, 40, 160, 160]
        );
        // An endpoint without a report gets the mean of the bounded weights, not of the lies.
        assert_eq!(
            publish_load_weights(&[Some(honest), Some(honest), Some(liar), None], &[None; 4], &[false; 4]),
            [50, 50, 200, 100]
        );
    }

    #[test]
    fn published_weights_up_to_u32_max_neither_overflow_nor_stay_out_of_range() {
        let max = Some(u32::MAX);
        // The schema admits any u32: such a weight is not this policy's and is replaced.
        assert_eq!(
            publish_load_weights(&[Some(1.0), Some(1.0)], &[max, Some(u32::MAX - 1)], &[false; 2]),
            [100, 100]
        );
        // Held while its prober has no valid weight: held within the policy's range.
        assert_eq!(
            publish_load_weights(&[None, Some(1.0)], &[max, Some(100)], &[true, false]),
            [MAX_STATIC_WEIGHT, 100]
        );
        // Compared with the hysteresis without overflowing (a panic in debug builds, a wrong
        // comparison in release ones before).
        assert_eq!(
            publish_load_weights(&[Some(1.0), Some(1.0), Some(2.0)], &[None, None, max], &[false; 3]),
            [75, 75, 150]
        );
    }

    #[test]
    fn weights_too_large_to_add_up_keep_their_ratios() {
        assert_eq!(
            publish_load_weights(
                &[Some(f64::MAX), Some(f64::MAX), Some(f64::MAX / 2.0)],
                &[None; 3],
                &[false; 3]
            ),
            [120, 120, 60]
        );
    }

    #[test]
    fn a_restarted_operator_holds_the_published_weights_until_its_own_are_valid() {
        let published = [Some(75), Some(75), Some(150)];
        // Just restarted: no valid weight yet, every prober young: nothing changes.
        assert_eq!(
            publish_load_weights(&[None, None, None], &published, &[true; 3]),
            [75, 75, 150]
        );
        // Two have valid weights again, one is still in its blackout: it keeps its weight.
        assert_eq!(
            publish_load_weights(&[Some(1.0), Some(1.0), None], &published, &[false, false, true]),
            [75, 75, 150]
        );
        // A new endpoint (nothing published) gets the mean, held or not.
        assert_eq!(
            publish_load_weights(&[Some(1.0), None], &[Some(100), None], &[false, true]),
            [100, 100]
        );
    }

    mod hostile_input {
        use proptest::prelude::*;

        use super::*;

        /// Any f64 at all: NaN, infinities, negatives, zeros, subnormals, 1e300.
        fn any_f64() -> impl Strategy<Value = f64> {
            prop_oneof![
                proptest::num::f64::ANY,
                Just(f64::NAN),
                Just(f64::INFINITY),
                Just(f64::MIN_POSITIVE / 4.0),
                Just(1e300),
                Just(-1e300),
                Just(0.0),
            ]
        }

        proptest! {
            #[test]
            fn any_report_gives_no_weight_or_a_finite_positive_one(
                reports in proptest::collection::vec((any_f64(), any_f64(), any_f64()), 1..5),
                penalty in any_f64(),
                blackout in any::<u64>(),
                expiration in any::<u64>(),
            ) {
                let settings = LoadSettings {
                    blackout_period: Duration::from_nanos(blackout),
                    weight_expiration_period: Duration::from_nanos(expiration),
                    error_utilization_penalty: penalty,
                };
                let now = Instant::now();
                let mut weight = LoadWeight::default();
                for (qps, eps, utilization) in reports {
                    weight.update(sample(qps, eps, utilization), settings.weight_expiration_period, now);
                    if let Some(w) = weight.current(&settings, now) {
                        prop_assert!(w.is_finite() && w > 0.0, "{w}");
                    }
                    let _ = weight.changes_in(&settings, now);
                }
            }

            #[test]
            fn any_weights_publish_within_range(
                endpoints in proptest::collection::vec(
                    (proptest::option::of(any_f64()), proptest::option::of(any::<u32>()), any::<bool>()),
                    0..12,
                ),
            ) {
                let current: Vec<Option<f64>> = endpoints.iter().map(|e| e.0).collect();
                let published: Vec<Option<u32>> = endpoints.iter().map(|e| e.1).collect();
                let hold: Vec<bool> = endpoints.iter().map(|e| e.2).collect();
                let weights = publish_load_weights(&current, &published, &hold);
                prop_assert_eq!(weights.len(), endpoints.len());
                for weight in &weights {
                    prop_assert!((1..=MAX_STATIC_WEIGHT).contains(weight), "{weights:?}");
                }
            }

            #[test]
            fn no_weight_exceeds_four_times_the_median_one(
                current in proptest::collection::vec(proptest::option::of(any_f64()), 1..12),
            ) {
                let n = current.len();
                let weights = publish_load_weights(&current, &vec![None; n], &vec![false; n]);
                let mut valid: Vec<u32> = current
                    .iter()
                    .zip(&weights)
                    .filter(|(c, _)| c.is_some_and(|c| c.is_finite() && c > 0.0))
                    .map(|(_, w)| *w)
                    .collect();
                valid.sort_unstable();
                if let Some(median) = valid.get(valid.len().saturating_sub(1) / 2) {
                    // Each weight is rounded on its own: up to half a unit each way.
                    for weight in &weights {
                        prop_assert!(*weight <= 4 * median + 3, "{weights:?} from {current:?}");
                    }
                }
            }
        }
    }
}
