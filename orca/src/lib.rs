//! ORCA load reports (gRFC A51/A58), the messages the kubegrpc operator reads to weight
//! endpoints under the `LoadReport` policy.
//!
//! The messages are declared here with prost rather than generated: no kept crate that matches
//! tonic/prost 0.14 carries them (`envoy-types` has xDS, not ORCA). Field numbers and types
//! follow `xds/data/orca/v3/orca_load_report.proto` and `xds/service/orca/v3/orca.proto` of
//! github.com/cncf/xds.

use std::collections::HashMap;

/// The out-of-band stream's full method path.
pub const STREAM_CORE_METRICS_PATH: &str = "/xds.service.orca.v3.OpenRcaService/StreamCoreMetrics";

/// `xds.data.orca.v3.OrcaLoadReport`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OrcaLoadReport {
    /// CPU utilization, normally from 0 to 1 (may exceed 1 on a busy, unconstrained host).
    #[prost(double, tag = "1")]
    pub cpu_utilization: f64,
    #[prost(double, tag = "2")]
    pub mem_utilization: f64,
    /// Deprecated in favour of `rps_fractional`.
    #[prost(uint64, tag = "3")]
    pub rps: u64,
    #[prost(map = "string, double", tag = "4")]
    pub request_cost: HashMap<String, f64>,
    #[prost(map = "string, double", tag = "5")]
    pub utilization: HashMap<String, f64>,
    /// Requests per second the server handled.
    #[prost(double, tag = "6")]
    pub rps_fractional: f64,
    /// Errors per second the server returned.
    #[prost(double, tag = "7")]
    pub eps: f64,
    #[prost(map = "string, double", tag = "8")]
    pub named_metrics: HashMap<String, f64>,
    /// The application's own measure of how busy it is, from 0 to 1; preferred over
    /// `cpu_utilization` when above 0.
    #[prost(double, tag = "9")]
    pub application_utilization: f64,
}

/// `google.protobuf.Duration`.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct ProtoDuration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl From<std::time::Duration> for ProtoDuration {
    fn from(duration: std::time::Duration) -> Self {
        Self {
            seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
            nanos: duration.subsec_nanos() as i32,
        }
    }
}

impl ProtoDuration {
    /// As a std duration; negative values become zero.
    pub fn to_std(self) -> std::time::Duration {
        if self.seconds < 0 || self.nanos < 0 {
            return std::time::Duration::ZERO;
        }
        std::time::Duration::new(self.seconds as u64, self.nanos.min(999_999_999) as u32)
    }
}

/// `xds.service.orca.v3.OrcaLoadReportRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OrcaLoadReportRequest {
    /// How often the client would like reports (the server may send less often).
    #[prost(message, optional, tag = "1")]
    pub report_interval: Option<ProtoDuration>,
    #[prost(string, repeated, tag = "2")]
    pub request_cost_names: Vec<String>,
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn a_report_round_trips_and_uses_the_upstream_field_numbers() {
        let report = OrcaLoadReport {
            cpu_utilization: 0.5,
            rps_fractional: 100.0,
            eps: 2.0,
            application_utilization: 0.25,
            ..Default::default()
        };
        let bytes = report.encode_to_vec();
        // Tag 9, wire type 1 (64-bit): application_utilization is field 9 as upstream.
        assert!(bytes.windows(1).any(|b| b[0] == (9 << 3 | 1)));
        assert_eq!(OrcaLoadReport::decode(bytes.as_slice()).unwrap(), report);
    }

    #[test]
    fn a_request_carries_its_interval_as_a_protobuf_duration() {
        let request = OrcaLoadReportRequest {
            report_interval: Some(std::time::Duration::from_millis(1500).into()),
            request_cost_names: Vec::new(),
        };
        let bytes = request.encode_to_vec();
        // Field 1, length-delimited (8 bytes): seconds 1 (field 1), nanos 5e8 (field 2, 5 bytes).
        assert_eq!(&bytes[..5], &[0x0a, 0x08, 0x08, 0x01, 0x10]);
        let back = OrcaLoadReportRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.report_interval.unwrap().to_std(), std::time::Duration::from_millis(1500));
    }
}
