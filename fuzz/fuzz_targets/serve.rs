//! Fuzz target `serve`: see `preseed_fuzz::serve`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| preseed_fuzz::serve(data));
