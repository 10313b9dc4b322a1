#![no_main]
//! See [`kubegrpc_fuzz::operator::HPACK`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| (kubegrpc_fuzz::operator::HPACK.run)(data));
