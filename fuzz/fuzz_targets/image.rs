//! Fuzz target `image`: see `preseed_fuzz::image`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| preseed_fuzz::image(data));
