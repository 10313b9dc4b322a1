//! Prints a server's ORCA out-of-band load reports, one line each: a quick look at what a
//! backend tells the operator.
//!
//!   cargo run -p kubegrpc-orca --example orca-watch -- http://127.0.0.1:50051 [INTERVAL_MS]

use std::time::{Duration, Instant};

use kubegrpc_orca::{OpenRcaServiceClient, OrcaLoadReportRequest};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(address), interval) = (args.next(), args.next()) else {
        return Err("usage: orca-watch http://HOST:PORT [INTERVAL_MS]".into());
    };
    let interval = Duration::from_millis(interval.as_deref().unwrap_or("1000").parse()?);
    let mut client = OpenRcaServiceClient::connect(address).await?;
    let mut reports = client
        .stream_core_metrics(OrcaLoadReportRequest {
            report_interval: Some(interval.into()),
            request_cost_names: Vec::new(),
        })
        .await?
        .into_inner();
    let start = Instant::now();
    while let Some(report) = reports.message().await? {
        println!(
            "{:>8.3}s rps {:.2} eps {:.2} application_utilization {:.3} cpu_utilization {:.3} named {:?}",
            start.elapsed().as_secs_f64(),
            report.rps_fractional,
            report.eps,
            report.application_utilization,
            report.cpu_utilization,
            report.named_metrics,
        );
    }
    Ok(())
}
