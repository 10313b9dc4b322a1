//! kubegrpc's fuzz targets, as plain functions over bytes: run by libFuzzer through cargo-fuzz
//! (`fuzz_targets/`, `make fuzz`), and replayed on stable by `cargo test` (the tests
//! `fuzz_targets` of the operator and client crates include these files by path) over the
//! committed corpus and fixed-seed mutations of it.

pub mod client;
pub mod input;
pub mod operator;
