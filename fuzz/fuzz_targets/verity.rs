//! Fuzz target `verity`: see `preseed_fuzz::verity`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| preseed_fuzz::verity(data));
