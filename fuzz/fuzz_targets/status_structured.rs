#![no_main]
//! See [`kubegrpc_fuzz::client::STATUS_STRUCTURED`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| (kubegrpc_fuzz::client::STATUS_STRUCTURED.run)(data));
