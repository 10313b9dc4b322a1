#![no_main]
//! See [`kubegrpc_fuzz::operator::XDS_REQUESTS`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| (kubegrpc_fuzz::operator::XDS_REQUESTS.run)(data));
