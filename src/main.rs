//! The `preseed` command: parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use preseed::bundle::{self, BundleOptions, Progress};
use preseed::partition::Format;

#[derive(Parser)]
#[command(name = "preseed", version, about = "Preload pinned container images into containerd from a boot partition")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pull, verify and pack every image of bundles.toml into a partition image.
    Bundle {
        /// The manifest.
        #[arg(long, default_value = "bundles.toml")]
        manifest: PathBuf,
        /// Output directory.
        #[arg(long, default_value = "target/preseed")]
        out: PathBuf,
        /// Partition format (overrides bundles.toml).
        #[arg(long)]
        format: Option<Format>,
        /// Blob cache directory [default: <out>/../preseed-cache].
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Build from the cache alone; fail naming any missing blob.
        #[arg(long)]
        offline: bool,
        /// Accept remote images without a digest.
        #[arg(long)]
        allow_unpinned: bool,
        /// Concurrent downloads.
        #[arg(long, default_value_t = 8)]
        jobs: usize,
        /// Plain log lines even on a terminal.
        #[arg(long)]
        no_progress: bool,
    },
    /// Resolve tags to digests and write them into bundles.toml in place.
    Pin {
        /// The manifest.
        #[arg(long, default_value = "bundles.toml")]
        manifest: PathBuf,
        /// Re-resolve tags of references that already have a digest.
        #[arg(long)]
        update: bool,
    },
    /// Show what a partition (image file or directory) holds.
    Inspect {
        /// Partition image or directory.
        partition: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("preseed: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Bundle { manifest, out, format, cache, offline, allow_unpinned, jobs, no_progress } => {
            let cache = cache.unwrap_or_else(|| out.parent().unwrap_or(&out).join("preseed-cache"));
            let build_target_dir = out.parent().unwrap_or(&out).join("preseed-images");
            let opts = BundleOptions {
                manifest,
                out,
                format,
                cache,
                offline,
                allow_unpinned,
                jobs,
                build_target_dir,
                progress: if no_progress { Progress::Lines } else { Progress::Auto },
            };
            let summary = bundle::bundle(&opts).await?;
            println!("{summary}");
        }
        Command::Pin { manifest, update } => {
            let changes = preseed::manifest::pin::pin(&manifest, update).await?;
            for c in &changes {
                println!("{}:{}: {} -> {}", manifest.display(), c.line, c.before, c.after);
            }
            println!("{} reference(s) pinned", changes.len());
        }
        Command::Inspect { partition, json } => {
            let index = preseed::partition::inspect::read_index(&partition)
                .with_context(|| format!("inspecting {}", partition.display()))?;
            if json {
                println!("{}", String::from_utf8_lossy(&index.to_json()).trim_end());
            } else {
                print!("{}", preseed::partition::inspect::render(&index));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
