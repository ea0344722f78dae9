//! The `preseed` command line, as clap definitions: `src/main.rs` parses it
//! and calls the library; `examples/manpages.rs` renders man pages and shell
//! completions from it (`cargo xtask dist`). It does no work beyond turning
//! flags into the library's types (reading a `--verity-root-hash-file`).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::partition::Format;

/// The `preseed` command line.
#[derive(Parser)]
#[command(name = "preseed", version, long_about = None, about = "Preload pinned container images into containerd from a boot partition")]
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Where the node side reads the partition from (exactly one).
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub struct SourceArgs {
    /// A partition image file (loop-mounted read-only).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// A block device holding the partition (mounted read-only).
    #[arg(long)]
    pub device: Option<PathBuf>,
    /// A directory: a mounted partition, or a Monogon/k3s preload directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

impl SourceArgs {
    /// The source these flags name.
    pub fn source(self) -> crate::node::read::open::Source {
        use crate::node::read::open::Source;
        match (self.image, self.device, self.dir) {
            (Some(p), _, _) => Source::Image(p),
            (_, Some(p), _) => Source::Device(p),
            (_, _, Some(p)) => Source::Dir(p),
            _ => unreachable!("clap requires one of --image, --device, --dir"),
        }
    }
}

/// Which images `load --unpack` unpacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Unpack {
    /// Every image.
    All,
    /// The boot images (the sandbox among them), before READY.
    Boot,
}

/// The subcommands; each field's doc is its `--help` text (flattened
/// groups document themselves).
#[allow(missing_docs)]
#[derive(Subcommand)]
pub enum Command {
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
    /// Publish a bundled erofs partition as a release that `preseed pull` rebuilds byte for byte.
    Push {
        /// The bundle's output directory (preseed.erofs and preseed.plan.json).
        out: PathBuf,
        /// Where to: registry/repository:tag.
        #[arg(value_name = "REF")]
        reference: String,
        /// Plain HTTP to the registry.
        #[arg(long)]
        insecure: bool,
        /// Machine-readable report.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a pushed release into a file or the inactive slot, fetching only what --from lacks.
    Pull {
        /// The release: registry/repository:tag or registry/repository@sha256:<hex>.
        #[arg(value_name = "REF")]
        reference: String,
        /// The image file or block device to write (put in place only once proven).
        #[arg(long)]
        to: PathBuf,
        /// The partition the node runs now (image file or device: mounted read-only, needs root; a mounted
        /// partition; or a bundle's output directory).
        #[arg(long)]
        from: Option<PathBuf>,
        /// Where fetched blobs wait between runs [default: <TO>.pull, or /var/cache/preseed/pull for a device].
        #[arg(long)]
        work: Option<PathBuf>,
        /// Plain HTTP to the registry.
        #[arg(long)]
        insecure: bool,
        /// Machine-readable report.
        #[arg(long)]
        json: bool,
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
    Load {
        #[command(flatten)]
        from: SourceArgs,
        /// containerd's gRPC socket.
        #[arg(long, default_value = crate::node::DEFAULT_ADDRESS)]
        address: PathBuf,
        /// Seconds to wait for containerd's socket.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Blob writes in flight at once.
        #[arg(long, default_value_t = 4)]
        jobs: usize,
        /// Also unpack layers into the snapshotter, flushed to disk, so the first start does not:
        /// every image (`--unpack`, `--unpack=all`) or the boot images only (`--unpack=boot`).
        #[arg(long, value_name = "WHICH", num_args = 0..=1, require_equals = true, default_missing_value = "all")]
        unpack: Option<Unpack>,
        /// Snapshotter for --unpack.
        #[arg(long, default_value = "overlayfs")]
        snapshotter: String,
        /// Machine-readable report on stdout.
        #[arg(long)]
        json: bool,
        /// Signature policy (TOML: which images must be signed, by which cosign keys); images that
        /// fail it are refused.
        #[arg(long, value_name = "FILE", env = "PRESEED_POLICY")]
        policy: Option<PathBuf>,
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
        #[arg(long, default_value = crate::node::place::config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// Copy nothing: mount the partition (erofs) for good as the lower layer of an overlay on
        /// containerd's content directory.
        #[arg(long)]
        overlay: bool,
        /// With --overlay: the partition that was the lower layer before (image file, device or
        /// directory), to keep the blobs only it had when the partition changed.
        #[arg(long, value_name = "PARTITION", requires = "overlay")]
        previous: Option<PathBuf>,
        /// Machine-readable report on stdout.
        #[arg(long)]
        json: bool,
        /// Signature policy (TOML: which images must be signed, by which cosign keys); images that
        /// fail it are refused.
        #[arg(long, value_name = "FILE", env = "PRESEED_POLICY")]
        policy: Option<PathBuf>,
        #[command(flatten)]
        verity: VerityArgs,
    },
    /// With place --overlay: copy the blobs only the partition under containerd's store has into its
    /// writable layer, so the partition can be replaced without --previous (runs while containerd runs).
    Settle {
        /// containerd's root directory [default: `root` in --config, else /var/lib/containerd].
        #[arg(long)]
        root: Option<PathBuf>,
        /// containerd's configuration file.
        #[arg(long, default_value = crate::node::place::config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// The partition that will replace the current one (image file, device or directory): the
        /// blobs it ships are not copied.
        #[arg(long, value_name = "PARTITION")]
        next: Option<PathBuf>,
        /// Machine-readable report on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Serve a partition's images as a read-only OCI registry (a mirror for containerd, CRI-O, podman).
    Serve {
        #[command(flatten)]
        from: SourceArgs,
        /// Address to listen on (port 0: any free port, printed at start).
        #[arg(long, default_value = crate::node::serve::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
        /// Signature policy (TOML: which images must be signed, by which cosign keys); images that
        /// fail it are refused.
        #[arg(long, value_name = "FILE", env = "PRESEED_POLICY")]
        policy: Option<PathBuf>,
    },
    /// What a node must newly import moving from partition OLD to NEW (added, removed, changed, retagged images; new bytes).
    Diff {
        /// The partition nodes have now: an image file or device (mounted read-only: needs root),
        /// a directory (a mounted partition, or a bundle output directory) or a preseed.json.
        old: PathBuf,
        /// The partition they move to (the same kinds).
        new: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
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

impl Command {
    /// Whether the command runs on the node (at boot, beside the workloads)
    /// rather than on a build machine.
    pub fn is_node_side(&self) -> bool {
        matches!(
            self,
            Command::Load { .. }
                | Command::Place { .. }
                | Command::Settle { .. }
                | Command::Serve { .. }
                | Command::Pull { .. }
        )
    }
}

/// What `load` says in a binary built without the loader.
pub const NO_LOADER: &str = "this preseed was built without the loader (the `containerd` cargo feature: `cargo xtask \
    bundle` builds it so, to need no protoc); the full binary is target/dist/preseed from `cargo xtask dist`, or build \
    it with `cargo build --release` (its gRPC bindings need protoc: apt-get install protobuf-compiler)";

/// `--verity-root-hash HEX | --verity-root-hash-file F` (load, place, inspect).
#[derive(clap::Args)]
pub struct VerityArgs {
    /// Open the partition through dm-verity with this root hash (hex, as in preseed.roothash).
    #[arg(long, value_name = "HEX", conflicts_with = "verity_root_hash_file")]
    pub verity_root_hash: Option<crate::partition::verity::RootHash>,
    /// The same, read from a file: the hash alone, or a kernel command line
    /// with `preseed.roothash=HEX` (e.g. /proc/cmdline).
    #[arg(long, value_name = "FILE")]
    pub verity_root_hash_file: Option<PathBuf>,
}

impl VerityArgs {
    /// The root hash given, read from its file if need be.
    pub fn root_hash(
        &self,
    ) -> Result<Option<crate::partition::verity::RootHash>, crate::partition::verity::RootHashError> {
        Ok(match (&self.verity_root_hash, &self.verity_root_hash_file) {
            (Some(h), _) => Some(*h),
            (None, Some(f)) => Some(crate::partition::verity::RootHash::from_file(f)?),
            (None, None) => None,
        })
    }
}
