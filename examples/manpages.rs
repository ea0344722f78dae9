//! Renders `preseed`'s man pages and shell completions from its CLI
//! definition (`preseed::cli::Cli`) into OUTDIR: `man/preseed.1.gz` and one
//! `man/preseed-<subcommand>.1.gz` per subcommand, gzipped without name or
//! mtime so the same CLI gives the same bytes, and
//! `completions/{preseed.bash,_preseed,preseed.fish}`. `cargo xtask dist`
//! runs it (`cargo run --example manpages -- OUTDIR`); it is an
//! example so clap_mangen and clap_complete stay out of the preseed binary.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> Result<()> {
    let out: PathBuf = std::env::args_os().nth(1).context("usage: manpages OUTDIR")?.into();
    // As clap_mangen::generate_to: built, so each subcommand is named
    // `preseed-load` (its page, as git's are) and invoked as `preseed load`.
    let mut cli = preseed::cli::Cli::command().disable_help_subcommand(true);
    cli.build();
    let source = format!("preseed {}", env!("CARGO_PKG_VERSION"));
    let man = out.join("man");
    std::fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    for cmd in std::iter::once(&cli).chain(cli.get_subcommands()) {
        let page = clap_mangen::Man::new(cmd.clone()).source(&source);
        write_man(&man.join(format!("{}.gz", page.get_filename())), &page)?;
    }
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions).with_context(|| format!("creating {}", completions.display()))?;
    for (shell, file) in [(Shell::Bash, "preseed.bash"), (Shell::Zsh, "_preseed"), (Shell::Fish, "preseed.fish")] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cli.clone(), "preseed", &mut buf);
        write(&completions.join(file), &buf)?;
    }
    Ok(())
}

/// One man page, gzipped at level 9 with no file name and mtime 0.
fn write_man(path: &Path, page: &clap_mangen::Man) -> Result<()> {
    let mut roff = Vec::new();
    page.render(&mut roff)?;
    let mut gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::best());
    gz.write_all(&roff)?;
    write(path, &gz.finish()?)
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}
