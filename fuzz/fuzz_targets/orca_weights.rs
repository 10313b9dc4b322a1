#![no_main]
//! See [`kubegrpc_fuzz::operator::ORCA_WEIGHTS`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| (kubegrpc_fuzz::operator::ORCA_WEIGHTS.run)(data));
