//! `cargo xtask bench`: see issue 6. Not implemented yet.

use anyhow::{bail, Result};

/// Runs the benchmarks.
pub fn run(_args: &[String]) -> Result<()> {
    bail!("cargo xtask bench is not implemented yet")
}
