//! What the reconciler needs from a spec, checked again in code: admission (schema and CEL)
//! rejects bad specs, but an object admitted under an older, laxer CRD must still get a clear
//! `InvalidSpec` condition rather than odd behaviour.

use std::time::Duration;

use kubegrpc_crds::{GrpcBackendSpec, PortRef, WeightingPolicy};

use crate::{
    health::{
        prober::{LoadReportSettings, ProbeSettings},
        tracker::Thresholds,
    },
    weights::LoadSettings,
};

const MIN_INTERVAL: Duration = Duration::from_millis(100);
const MIN_TIMEOUT: Duration = Duration::from_millis(10);
const MAX_SLOW_START: Duration = Duration::from_secs(3600);

/// The probe settings of a valid spec, or a message naming the field and what is allowed.
pub fn probe_settings(spec: &GrpcBackendSpec) -> Result<ProbeSettings, String> {
    match &spec.port {
        PortRef::Number(n) if !(1..=65535).contains(n) => {
            return Err(format!(
                "spec.port {n} is out of range: a port number is from 1 to 65535"
            ));
        }
        PortRef::Name(name) if name.is_empty() || name.len() > 63 => {
            return Err("spec.port must be a port number or a Service port name of 1 to 63 characters".into());
        }
        _ => {}
    }
    let check = &spec.health_check;
    if check.interval.is_negative() || check.interval() < MIN_INTERVAL {
        return Err(format!(
            "spec.healthCheck.interval must be at least 100ms (it is {})",
            check.interval
        ));
    }
    if check.timeout.is_negative() || check.timeout() < MIN_TIMEOUT {
        return Err(format!(
            "spec.healthCheck.timeout must be at least 10ms (it is {})",
            check.timeout
        ));
    }
    if check.timeout() >= check.interval() {
        return Err(format!(
            "spec.healthCheck.timeout ({}) must be shorter than spec.healthCheck.interval ({})",
            check.timeout, check.interval
        ));
    }
    let threshold = |field: &str, value: i32| {
        u32::try_from(value)
            .ok()
            .filter(|v| (1..=100).contains(v))
            .ok_or_else(|| format!("spec.healthCheck.{field} must be from 1 to 100 (it is {value})"))
    };
    let thresholds = Thresholds {
        healthy: threshold("healthyThreshold", check.healthy_threshold)?,
        unhealthy: threshold("unhealthyThreshold", check.unhealthy_threshold)?,
    };
    if let Some(window) = spec.weighting.slow_start_window
        && (window.is_negative() || Duration::from(window) > MAX_SLOW_START)
    {
        return Err(format!(
            "spec.weighting.slowStartWindow must be from 0s to 1h (it is {window})"
        ));
    }
    if let Some(aggression) = spec.weighting.slow_start_aggression
        && !(0.1..=10.0).contains(&aggression)
    {
        return Err(format!(
            "spec.weighting.slowStartAggression must be from 0.1 to 10 (it is {aggression})"
        ));
    }
    if let Some(percent) = spec.weighting.slow_start_min_weight_percent
        && !(1..=100).contains(&percent)
    {
        return Err(format!(
            "spec.weighting.slowStartMinWeightPercent must be from 1 to 100 (it is {percent})"
        ));
    }
    let load_reports = match spec.weighting.policy {
        WeightingPolicy::LoadReport => {
            let load = load_settings(spec)?;
            Some(LoadReportSettings {
                interval: spec.weighting.load_report().report_interval(),
                weight_expiration_period: load.weight_expiration_period,
            })
        }
        _ => None,
    };
    Ok(ProbeSettings {
        service: check.service.clone(),
        mode: check.mode,
        interval: check.interval(),
        timeout: check.timeout(),
        thresholds,
        load_reports,
        // Set by the reconciler, which reads the CA bundle (see crate::controller).
        tls: None,
    })
}

/// The `LoadReport` policy's settings of a valid spec (defaults when unset).
pub fn load_settings(spec: &GrpcBackendSpec) -> Result<LoadSettings, String> {
    let load = spec.weighting.load_report();
    let interval = load.report_interval();
    if load.report_interval.is_negative() || !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&interval) {
        return Err(format!(
            "spec.weighting.loadReport.reportInterval must be from 1s to 5m (it is {})",
            load.report_interval
        ));
    }
    if load.blackout_period.is_negative() || load.blackout_period() > Duration::from_secs(3600) {
        return Err(format!(
            "spec.weighting.loadReport.blackoutPeriod must be from 0s to 1h (it is {})",
            load.blackout_period
        ));
    }
    let expiration = load.weight_expiration_period();
    if load.weight_expiration_period.is_negative()
        || !(Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&expiration)
    {
        return Err(format!(
            "spec.weighting.loadReport.weightExpirationPeriod must be from 1s to 24h (it is {})",
            load.weight_expiration_period
        ));
    }
    if !(0.0..=100.0).contains(&load.error_utilization_penalty) {
        return Err(format!(
            "spec.weighting.loadReport.errorUtilizationPenalty must be from 0 to 100 (it is {})",
            load.error_utilization_penalty
        ));
    }
    Ok(LoadSettings {
        blackout_period: load.blackout_period(),
        weight_expiration_period: expiration,
        error_utilization_penalty: load.error_utilization_penalty,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec(value: serde_json::Value) -> GrpcBackendSpec {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_default_spec_gives_watch_settings() {
        let settings = probe_settings(&spec(json!({"service": "echo", "port": "grpc"}))).unwrap();
        assert_eq!(settings.interval, Duration::from_secs(5));
        assert_eq!(settings.timeout, Duration::from_secs(1));
        assert_eq!(
            settings.thresholds,
            Thresholds {
                healthy: 1,
                unhealthy: 3
            }
        );
    }

    #[test]
    fn specs_admission_would_refuse_are_refused_naming_the_field() {
        let refused = |value| probe_settings(&spec(value)).unwrap_err();
        assert!(refused(json!({"service": "e", "port": 70000})).starts_with("spec.port"));
        assert!(
            refused(json!({"service": "e", "port": 1, "healthCheck": {"interval": "50ms", "timeout": "10ms"}}))
                .starts_with("spec.healthCheck.interval")
        );
        assert!(
            refused(json!({"service": "e", "port": 1, "healthCheck": {"interval": "1s", "timeout": "2s"}}))
                .starts_with("spec.healthCheck.timeout")
        );
        assert!(
            refused(json!({"service": "e", "port": 1, "healthCheck": {"interval": "-1s"}}))
                .starts_with("spec.healthCheck.interval")
        );
        assert!(
            refused(json!({"service": "e", "port": 1, "healthCheck": {"unhealthyThreshold": 0}}))
                .starts_with("spec.healthCheck.unhealthyThreshold")
        );
        assert!(
            refused(json!({"service": "e", "port": 1, "weighting": {"slowStartWindow": "2h"}}))
                .starts_with("spec.weighting.slowStartWindow")
        );
        assert!(
            refused(json!({"service": "e", "port": 1, "weighting": {"slowStartAggression": 0.0}}))
                .starts_with("spec.weighting.slowStartAggression")
        );
        assert!(
            refused(json!({"service": "e", "port": 1, "weighting": {"policy": "LoadReport",
                "loadReport": {"reportInterval": "100ms"}}}))
            .starts_with("spec.weighting.loadReport.reportInterval")
        );
        assert!(
            refused(json!({"service": "e", "port": 1, "weighting": {"policy": "LoadReport",
                "loadReport": {"errorUtilizationPenalty": -1.0}}}))
            .starts_with("spec.weighting.loadReport.errorUtilizationPenalty")
        );
    }

    #[test]
    fn load_report_asks_the_prober_for_reports_with_a58_defaults() {
        let load = spec(json!({"service": "e", "port": 1, "weighting": {"policy": "LoadReport"}}));
        let settings = probe_settings(&load).unwrap();
        assert_eq!(
            settings.load_reports,
            Some(LoadReportSettings {
                interval: Duration::from_secs(10),
                weight_expiration_period: Duration::from_secs(180),
            })
        );
        let a58 = load_settings(&load).unwrap();
        assert_eq!(a58.blackout_period, Duration::from_secs(10));
        assert_eq!(a58.error_utilization_penalty, 1.0);
        let equal = spec(json!({"service": "e", "port": 1}));
        assert_eq!(probe_settings(&equal).unwrap().load_reports, None);
    }
}
