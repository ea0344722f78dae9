//! Fuzz target `index`: see `preseed_fuzz::index`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| preseed_fuzz::index(data));
