//! Fuzz target `tar`: see `preseed_fuzz::tar`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| preseed_fuzz::tar(data));
