//! Generates the `xds.service.orca.v3.OpenRcaService` client and server from a Rust description
//! (tonic-build's manual mode), so that building needs no `protoc`. The messages are the prost
//! structs in `src/lib.rs`.
//!
//! It also generates `kubegrpc.orca.test.Work`, a service used only by the integration tests
//! (which include it from `OUT_DIR`), so that they exercise real generated tonic servers.

fn main() {
    let method = |name: &str, route: &str, input: &str, output: &str| {
        tonic_build::manual::Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("crate::{input}"))
            .output_type(format!("crate::{output}"))
            .codec_path("tonic_prost::ProstCodec")
    };
    let orca = tonic_build::manual::Service::builder()
        .name("OpenRcaService")
        .package("xds.service.orca.v3")
        .comment("Out-of-band load reports: the server streams one `OrcaLoadReport` per interval.")
        .method(
            method(
                "stream_core_metrics",
                "StreamCoreMetrics",
                "OrcaLoadReportRequest",
                "OrcaLoadReport",
            )
            .server_streaming()
            .build(),
        )
        .build();
    let work = tonic_build::manual::Service::builder()
        .name("Work")
        .package("kubegrpc.orca.test")
        .method(method("work", "Work", "WorkRequest", "WorkReply").build())
        .build();
    tonic_build::manual::Builder::new().compile(&[orca, work]);
}
