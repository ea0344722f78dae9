//! Fuzz target `manifest`: see `preseed_fuzz::manifest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| preseed_fuzz::manifest(data));
