//! Fuzz target `trust`: see `preseed_fuzz::trust`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| preseed_fuzz::trust(data));
