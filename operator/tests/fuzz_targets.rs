//! The operator's fuzz targets (fuzz/src/operator.rs: the prober's connection fed a server's
//! bytes, HPACK decoding, ORCA reports and their weights, xDS request handling), replayed on stable over the committed corpus and fixed-seed
//! mutations: no input may panic. cargo-fuzz runs the same functions with coverage feedback
//! (`make fuzz`).

// Shared with the fuzz crate and the client's replay: not every item is used here.
#[allow(dead_code)]
#[path = "../../fuzz/src/input.rs"]
mod input;
#[path = "../../fuzz/src/operator.rs"]
mod operator;

use operator::TARGETS;

include!("../../fuzz/src/replay.rs");

#[test]
fn fuzz_target_hpack() {
    replay("hpack");
}

#[test]
fn fuzz_target_connection() {
    replay("connection");
}

#[test]
fn fuzz_target_orca_weights() {
    replay("orca_weights");
}

#[test]
fn fuzz_target_xds_requests() {
    replay("xds_requests");
}
