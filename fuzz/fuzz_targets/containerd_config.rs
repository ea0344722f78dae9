//! Fuzz target `containerd_config`: see `preseed_fuzz::containerd_config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| preseed_fuzz::containerd_config(data));
