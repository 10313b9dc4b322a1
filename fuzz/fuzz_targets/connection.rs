#![no_main]
//! See [`kubegrpc_fuzz::operator::CONNECTION`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| (kubegrpc_fuzz::operator::CONNECTION.run)(data));
