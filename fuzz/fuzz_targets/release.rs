//! Fuzz target `release`: see `preseed_fuzz::release`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| preseed_fuzz::release(data));
