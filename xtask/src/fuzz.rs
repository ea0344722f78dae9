//! `cargo xtask fuzz [--seconds N] [TARGET…]`: coverage-guided fuzzing of
//! every parser of untrusted bytes (the `fuzz/` crate, cargo fuzz with
//! libFuzzer), one target after the other.
//!
//! Steps: install cargo-fuzz if missing; write each target's seed corpus
//! from real formats (`fuzz/examples/seeds.rs`) into `target/fuzz/corpus/`;
//! replay every input under `fuzz/regressions/<target>/` (crashes found
//! before, kept as regression tests); then fuzz each target for N seconds
//! (default 5: the smoke `cargo xtask test` runs). A crash fails the run and
//! names the input libFuzzer saved under `target/fuzz/artifacts/`. The
//! summary is a markdown table, as FUZZING.md records the long run.
//!
//! No sanitizer (`-s none`): the fuzzed code is safe Rust, and cargo fuzz's
//! sanitizers need a nightly compiler; libFuzzer still catches panics,
//! timeouts (`-timeout`) and memory growth (`-rss_limit_mb`).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::Counts;

/// Every target, in `fuzz/Cargo.toml` order.
pub const TARGETS: &[&str] =
    &["tar", "image", "index", "serve", "verity", "manifest", "containerd_config", "trust", "release"];

/// One target's run.
pub struct Outcome {
    pub target: String,
    pub runs: u64,
    pub seconds: u64,
    pub corpus: usize,
    pub failure: Option<String>,
}

/// `cargo xtask fuzz`.
pub fn run(args: &[String]) -> Result<()> {
    let mut seconds = 5u64;
    let mut targets = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => seconds = it.next().context("--seconds needs a value")?.parse().context("--seconds")?,
            t if TARGETS.contains(&t) => targets.push(t.to_string()),
            other => bail!("unknown argument {other}\nusage: cargo xtask fuzz [--seconds N] [{}]", TARGETS.join("|")),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| t.to_string()).collect();
    }
    let outcomes = fuzz(&targets, seconds)?;
    let failed: Vec<&str> = outcomes.iter().filter_map(|o| o.failure.as_deref().map(|_| o.target.as_str())).collect();
    if !failed.is_empty() {
        bail!("fuzzing found crashes in: {}", failed.join(", "));
    }
    Ok(())
}

/// The smoke `cargo xtask test` runs: every target a few seconds, and every
/// regression input.
pub fn smoke(counts: &mut Counts) -> Result<()> {
    let targets: Vec<String> = TARGETS.iter().map(|t| t.to_string()).collect();
    for o in fuzz(&targets, 5)? {
        match o.failure {
            None => counts.passed += 1,
            Some(_) => counts.failed += 1,
        }
    }
    Ok(())
}

/// Builds, seeds, replays and fuzzes `targets`; prints the summary.
fn fuzz(targets: &[String], seconds: u64) -> Result<Vec<Outcome>> {
    let root = crate::workspace_root()?;
    ensure_cargo_fuzz()?;
    let work = root.join("target/fuzz");
    let corpus = work.join("corpus");
    println!("xtask: fuzz: writing the seed corpora into {}", corpus.display());
    crate::run_status(
        crate::cargo()
            .current_dir(root.join("fuzz"))
            .args(["run", "--quiet", "--example", "seeds", "--"])
            .arg(&corpus)
            .arg(&root),
    )?;
    crate::run_status(crate::cargo().current_dir(&root).args(["fuzz", "build", "-s", "none"]))?;
    let mut outcomes = Vec::new();
    for t in targets {
        let artifacts = work.join("artifacts").join(t);
        std::fs::create_dir_all(&artifacts)?;
        let prefix = format!("-artifact_prefix={}/", artifacts.display());
        let mut failure = None;
        let regressions = root.join("fuzz/regressions").join(t);
        if regressions.read_dir().is_ok_and(|mut d| d.next().is_some()) {
            let status = fuzz_cmd(&root, t)
                .arg(&regressions)
                .args(["--", "-runs=0", &prefix])
                .status()
                .context("running cargo fuzz")?;
            if !status.success() {
                failure = Some(format!("a regression input of fuzz/regressions/{t} fails again"));
            }
        }
        let dir = corpus.join(t);
        std::fs::create_dir_all(&dir)?;
        let started = Instant::now();
        let out = fuzz_cmd(&root, t)
            .arg(&dir)
            .args(["--", &format!("-max_total_time={seconds}"), "-rss_limit_mb=1024", "-timeout=10", &prefix])
            .output()
            .context("running cargo fuzz")?;
        let log = String::from_utf8_lossy(&out.stderr);
        let runs = log
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("Done ").and_then(|r| r.split_whitespace().next()?.parse().ok()))
            .unwrap_or(0);
        if !out.status.success() && failure.is_none() {
            let saved = log.lines().find(|l| l.contains("Test unit written to")).unwrap_or("").trim().to_string();
            let tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
            eprintln!("{}", tail.join("\n"));
            failure = Some(format!("crashed ({}); {saved}", out.status));
        }
        let corpus_size = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        let elapsed = started.elapsed().as_secs().max(1);
        println!(
            "xtask: fuzz {t}: {runs} runs in {elapsed} s ({} exec/s), corpus {corpus_size}{}",
            runs / elapsed,
            failure.as_deref().map(|f| format!(": FAILED: {f}")).unwrap_or_default()
        );
        outcomes.push(Outcome { target: t.clone(), runs, seconds: elapsed, corpus: corpus_size, failure });
    }
    println!("\n| target | runs | seconds | exec/s | corpus | result |\n|---|---|---|---|---|---|");
    for o in &outcomes {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            o.target,
            o.runs,
            o.seconds,
            o.runs / o.seconds.max(1),
            o.corpus,
            o.failure.as_deref().unwrap_or("no crash")
        );
    }
    Ok(outcomes)
}

fn fuzz_cmd(root: &Path, target: &str) -> Command {
    let mut c = crate::cargo();
    c.current_dir(root).args(["fuzz", "run", "-s", "none", target]);
    c
}

/// cargo-fuzz from crates.io, if `cargo fuzz` is not there yet.
fn ensure_cargo_fuzz() -> Result<()> {
    let have = crate::cargo().args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if !have {
        println!("xtask: fuzz: installing cargo-fuzz (cargo install --locked cargo-fuzz)");
        crate::run_status(crate::cargo().args(["install", "--locked", "cargo-fuzz"]))?;
    }
    Ok(())
}
