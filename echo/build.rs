//! Generates the Echo service's client and server from a Rust description (tonic-build's manual
//! mode), so that building needs no `protoc`. The messages are prost structs in `src/lib.rs`.

fn main() {
    let method = |name: &str, route: &str, input: &str, output: &str| {
        tonic_build::manual::Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("crate::{input}"))
            .output_type(format!("crate::{output}"))
            .codec_path("tonic_prost::ProstCodec")
            .build()
    };
    let echo = tonic_build::manual::Service::builder()
        .name("Echo")
        .package("kubegrpc.echo.v1")
        .method(method("echo", "Echo", "EchoRequest", "EchoReply"))
        .method(method("stats", "Stats", "StatsRequest", "StatsReply"))
        .method(method("set_health", "SetHealth", "SetHealthRequest", "SetHealthReply"))
        .build();
    tonic_build::manual::Builder::new().compile(&[echo]);
}
