//! The client's fuzz targets (fuzz/src/client.rs: the status parser, from raw bytes and from
//! statuses built field by field), replayed on stable over the committed corpus and fixed-seed
//! mutations: no input may panic, and no usable entry is lost. cargo-fuzz runs the same
//! functions with coverage feedback (`make fuzz`).

// Shared with the fuzz crate and the operator's replay: not every item is used here.
#[path = "../../fuzz/src/client.rs"]
mod client;
#[allow(dead_code)]
#[path = "../../fuzz/src/input.rs"]
mod input;

use client::TARGETS;

include!("../../fuzz/src/replay.rs");

#[test]
fn fuzz_target_status_json() {
    replay("status_json");
}

#[test]
fn fuzz_target_status_structured() {
    replay("status_structured");
}
