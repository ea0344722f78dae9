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

/// Where the node side reads the partition from (exactly one).
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct SourceArgs {
    /// A partition image file (loop-mounted read-only).
    #[arg(long)]
    image: Option<PathBuf>,
    /// A block device holding the partition (mounted read-only).
    #[arg(long)]
    device: Option<PathBuf>,
    /// A directory: a mounted partition, or a Monogon/k3s preload directory.
    #[arg(long)]
    dir: Option<PathBuf>,
}

impl SourceArgs {
    fn source(self) -> preseed::partition::open::Source {
        use preseed::partition::open::Source;
        match (self.image, self.device, self.dir) {
            (Some(p), _, _) => Source::Image(p),
            (_, Some(p), _) => Source::Device(p),
            (_, _, Some(p)) => Source::Dir(p),
            _ => unreachable!("clap requires one of --image, --device, --dir"),
        }
    }
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
        /// Append a dm-verity hash tree (also `[partition] verity = true`).
        #[arg(long)]
        verity: bool,
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
        /// Cargo workspace holding the packages of `build` entries [default: the manifest's directory].
        #[arg(long)]
        workspace: Option<PathBuf>,
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
    /// Import a partition's images into containerd (the node side, at boot).
    #[cfg(feature = "containerd")]
    Load {
        #[command(flatten)]
        from: SourceArgs,
        /// containerd's gRPC socket.
        #[arg(long, default_value = preseed::load::DEFAULT_ADDRESS)]
        address: PathBuf,
        /// Seconds to wait for containerd's socket.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Blob writes in flight at once.
        #[arg(long, default_value_t = 4)]
        jobs: usize,
        /// Also unpack layers into the snapshotter, so the first start does not.
        #[arg(long)]
        unpack: bool,
        /// Snapshotter for --unpack.
        #[arg(long, default_value = "overlayfs")]
        snapshotter: String,
        /// Machine-readable report on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        verity: VerityArgs,
    },
    /// Copy the partition's blobs into containerd's content store before it starts.
    Place {
        #[command(flatten)]
        from: SourceArgs,
        /// containerd's root directory [default: `root` in --config, else /var/lib/containerd].
        #[arg(long)]
        root: Option<PathBuf>,
        /// containerd's configuration file.
        #[arg(long, default_value = preseed::place::config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// Machine-readable report on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        verity: VerityArgs,
    },
    /// Serve a partition's images as a read-only OCI registry (a mirror for containerd, CRI-O, podman).
    Serve {
        #[command(flatten)]
        from: SourceArgs,
        /// Address to listen on (port 0: any free port, printed at start).
        #[arg(long, default_value = preseed::serve::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
    },
    /// Show what a partition (image file, device, directory or preseed.json) holds.
    Inspect {
        /// Partition image or directory.
        partition: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        verity: VerityArgs,
    },
}

/// `--verity-root-hash HEX | --verity-root-hash-file F` (load, place, inspect).
#[derive(clap::Args)]
struct VerityArgs {
    /// Open the partition through dm-verity with this root hash (hex, as in preseed.roothash).
    #[arg(long, value_name = "HEX", conflicts_with = "verity_root_hash_file")]
    verity_root_hash: Option<preseed::partition::verity_open::RootHash>,
    /// The same, read from a file: the hash alone, or a kernel command line
    /// with `preseed.roothash=HEX` (e.g. /proc/cmdline).
    #[arg(long, value_name = "FILE")]
    verity_root_hash_file: Option<PathBuf>,
}

impl VerityArgs {
    fn root_hash(&self) -> anyhow::Result<Option<preseed::partition::verity_open::RootHash>> {
        Ok(match (&self.verity_root_hash, &self.verity_root_hash_file) {
            (Some(h), _) => Some(*h),
            (None, Some(f)) => Some(preseed::partition::verity_open::RootHash::from_file(f)?),
            (None, None) => None,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("preseed: error: {}", message(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: many errors already include
/// their cause in their own message.
fn message(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg = format!("{msg}: {c}");
        }
    }
    msg
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Bundle {
            manifest,
            out,
            format,
            verity,
            cache,
            offline,
            allow_unpinned,
            jobs,
            no_progress,
            workspace,
        } => {
            let cache = cache.unwrap_or_else(|| out.parent().unwrap_or(&out).join("preseed-cache"));
            let opts = BundleOptions {
                manifest,
                out,
                format,
                verity,
                cache,
                offline,
                allow_unpinned,
                jobs,
                workspace,
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
        #[cfg(feature = "containerd")]
        Command::Load { from, address, timeout, jobs, unpack, snapshotter, json, verity } => {
            let mut opts = preseed::load::LoadOptions::new(from.source());
            opts.address = address;
            opts.timeout = std::time::Duration::from_secs(timeout);
            opts.jobs = jobs;
            opts.unpack = unpack;
            opts.snapshotter = snapshotter;
            opts.notify = preseed::load::notify::Notifier::from_env()
                .context("$NOTIFY_SOCKET is set but unusable")?
                .map(std::sync::Arc::new);
            opts.verity_root_hash = verity.root_hash()?;
            let report = preseed::load::load(&opts).await?;
            if json {
                println!("{}", report.to_json());
            } else {
                report.print_human(&mut std::io::stdout())?;
            }
            if report.failed() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Place { from, root, config, json, verity } => {
            let mut opts = preseed::place::PlaceOptions::new(from.source());
            opts.root = root;
            opts.config = config;
            opts.verity_root_hash = verity.root_hash()?;
            let report = tokio::task::spawn_blocking(move || preseed::place::place(&opts)).await??;
            if json {
                println!("{}", report.to_json());
            } else {
                report.print_human(&mut std::io::stdout())?;
            }
            if report.failed() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Serve { from, listen } => {
            let server = preseed::serve::Server::bind(&from.source(), listen).await?;
            for w in &server.catalog().warnings {
                eprintln!("preseed: warning: {w}");
            }
            println!(
                "preseed: serving {} image(s) in {} repositories from {} on http://{}",
                server.catalog().images,
                server.catalog().repository_count(),
                server.source_id(),
                server.local_addr()
            );
            server.run(preseed::serve::shutdown_signal()).await;
        }
        Command::Inspect { partition, json, verity } => {
            let index = match verity.root_hash()? {
                Some(root) => preseed::partition::inspect::read_index_verified(&partition, &root),
                None => preseed::partition::inspect::read_index(&partition),
            }
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
