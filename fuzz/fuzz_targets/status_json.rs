#![no_main]
//! See [`kubegrpc_fuzz::client::STATUS_JSON`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| (kubegrpc_fuzz::client::STATUS_JSON.run)(data));
