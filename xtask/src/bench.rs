//! `cargo xtask bench [--scale S]`: the benchmarks of issue 6.
//!
//! The benchmark itself is the ignored test `tests/bench.rs`, so it shares the
//! integration tests' harness (registry, corpus generator, containerd, mounts).
//! This runs it in release and has it rewrite `BENCHMARKS.md`, with load rows
//! for each containerd version `cargo xtask test` covers.

use anyhow::{bail, Context, Result};

/// Runs the benchmark; `--scale S` multiplies the corpus (default 1 ≈ 500 MB).
pub fn run(args: &[String]) -> Result<()> {
    let mut scale = "1".to_string();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--scale" => scale = it.next().context("--scale needs a value")?.clone(),
            s if s.starts_with("--scale=") => scale = s["--scale=".len()..].to_string(),
            other => bail!("unknown argument {other}\nusage: cargo xtask bench [--scale S]"),
        }
    }
    match scale.parse::<f64>() {
        Ok(s) if s > 0.0 && s.is_finite() => {}
        _ => bail!("--scale must be a positive number, not {scale}"),
    }
    crate::install_missing(&[("protobuf-compiler", "protoc")], "cargo xtask bench")?;
    let root = crate::workspace_root()?;
    // Load rows for every containerd version the tests cover.
    let versions = crate::test::containerds(&root.join("target"))?;
    let bins: Vec<String> = versions.iter().map(|v| v.bin.display().to_string()).collect();
    let mut cmd = crate::cargo();
    cmd.current_dir(&root)
        .args(["test", "--release", "--test", "bench", "--", "--ignored", "--nocapture", "--test-threads", "1"])
        .env("PRESEED_BENCH_SCALE", &scale)
        .env("PRESEED_BENCH_CONTAINERDS", bins.join(","))
        .env("PRESEED_BENCH_OUT", root.join("BENCHMARKS.md"));
    if let Some(protoc) = crate::protoc() {
        cmd.env("PROTOC", protoc);
    }
    crate::run_status(&mut cmd)
}
