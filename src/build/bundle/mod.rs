//! `preseed bundle`: the build wing's pipeline. `bundle_once` reads as
//! its stages, in order, each in a file of its own:
//!
//! 1. `gather`: resolve every remote image's manifests, build in-tree ones;
//! 2. the `[verify]` policy ([`crate::build::verify`]), before any blob moves;
//! 3. `Plan`: one tarball per image, planned from the descriptors alone;
//! 4. `fetch`: download each missing blob once, into the cache and (erofs)
//!    straight into the staged image, hashing each tarball as soon as its
//!    last blob is in (`sums`);
//! 5. `write`: the partition under a staging name while the cached blobs are
//!    hashed again, its verity tree, then the rename; and `preseed.json` beside it.

mod fetch;
mod gather;
mod progress;
mod sums;
mod write;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::build::cache::{BlobCache, CacheError};
use crate::build::intree::BuildError;
use crate::build::layout::tree::{PlannedFile, Tree};
use crate::build::layout::{self, TarballSpec};
use crate::build::manifest::{BundleManifest, ImageEntry, ManifestError, Strictness};
use crate::build::registry::{Registries, ResolveError, ResolvedImage};
use crate::build::write::{erofs, squashfs};
use crate::digest::Digest;
use crate::distribution::auth::DockerConfig;
pub use crate::human::human_bytes;
use crate::partition::index::{
    BuildInfo, IndexedBlob, IndexedImage, IndexedReferrer, PartitionIndex, SignedBy, INDEX_FILE, INDEX_VERSION,
};
use crate::partition::Format;
pub use progress::Progress;

/// What to bundle and how.
#[derive(Clone, Debug)]
pub struct BundleOptions {
    /// `bundles.toml`.
    pub manifest: PathBuf,
    /// Output directory (gets `preseed.<format>` and `preseed.json`).
    pub out: PathBuf,
    /// Overrides `[partition] format`.
    pub format: Option<Format>,
    /// Append a dm-verity hash tree (or `[partition] verity = true`).
    pub verity: bool,
    /// Blob cache directory.
    pub cache: PathBuf,
    /// Build from the cache alone.
    pub offline: bool,
    /// Allow remote images without a digest (resolved at bundle time).
    pub allow_unpinned: bool,
    /// Concurrent downloads.
    pub jobs: usize,
    /// The cargo workspace whose packages `build` entries name
    /// (default: the manifest's directory).
    pub workspace: Option<PathBuf>,
    /// Progress display.
    pub progress: Progress,
}

/// What a bundle run produced.
#[derive(Clone, Debug, Serialize)]
pub struct BundleSummary {
    /// The partition image.
    pub partition: PathBuf,
    /// Its format.
    pub format: Format,
    /// Number of images.
    pub images: usize,
    /// Bytes of unique blobs carried.
    pub unique_bytes: u64,
    /// Bytes downloaded in this run.
    pub downloaded_bytes: u64,
    /// Bytes of the partition image.
    pub partition_bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

impl std::fmt::Display for BundleSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bundled {} images, {} unique ({} downloaded) into {} ({}, {}) in {:.1}s",
            self.images,
            human_bytes(self.unique_bytes),
            human_bytes(self.downloaded_bytes),
            self.partition.display(),
            self.format,
            human_bytes(self.partition_bytes),
            self.seconds
        )
    }
}

/// Errors of a bundle run. Each names the image (and registry) concerned.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// bundles.toml is invalid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// Resolving or fetching failed.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// Building an in-tree image failed.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// An image is not signed as the `[verify]` policy requires.
    #[error(transparent)]
    Verify(Box<crate::build::verify::VerifyError>),
    /// In-tree images need the manifest to sit at a cargo workspace root.
    #[error("{image}: `build` entries need a cargo workspace: {manifest} not found; put bundles.toml at the workspace root or pass --workspace DIR")]
    NoWorkspace {
        /// Image label.
        image: String,
        /// Expected Cargo.toml.
        manifest: PathBuf,
    },
    /// Cache I/O.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// Writing the erofs image failed.
    #[error("writing {path}: {source}")]
    Erofs {
        /// Output path.
        path: PathBuf,
        /// The error.
        source: erofs::Error,
    },
    /// Writing the squashfs image failed.
    #[error("writing {path}: {source}")]
    Squashfs {
        /// Output path.
        path: PathBuf,
        /// The error.
        source: squashfs::Error,
    },
    /// Blobs in the cache no longer match their digests (damaged after
    /// they were stored). They have been removed from the cache; nothing was
    /// written to the output.
    #[error(
        "damaged blob(s) in the cache {cache}, removed from it:\n{}\nrun the bundle again without --offline to \
         fetch them again (or copy them into the cache from a machine that has them); no partition was written",
        .blobs.iter().map(|b| format!("  {} ({}), used by {}", b.digest, b.problem, b.images.join(", "))).collect::<Vec<_>>().join("\n")
    )]
    Damaged {
        /// The cache directory.
        cache: PathBuf,
        /// Each damaged blob.
        blobs: Vec<DamagedBlob>,
    },
    /// Another bundle is writing into the same output directory.
    #[error("another preseed bundle is writing into {out} (it holds {lock}): let it finish, or give another --out")]
    Busy {
        /// The output directory.
        out: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// Other I/O, with the path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl From<crate::build::verify::VerifyError> for BundleError {
    fn from(e: crate::build::verify::VerifyError) -> Self {
        BundleError::Verify(Box::new(e))
    }
}

/// A cache blob whose bytes do not match its digest.
#[derive(Debug, Clone)]
pub struct DamagedBlob {
    /// Its digest (its name in the cache).
    pub digest: Digest,
    /// What is wrong (what it hashes to, or why it could not be read).
    pub problem: String,
    /// The images that use it.
    pub images: Vec<String>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io { path: path.to_path_buf(), source }
}

/// Held while a bundle writes into `--out`: one bundle per directory.
const LOCK_FILE: &str = ".preseed-bundle.lock";

/// What every stage reads: the options, and what they and the manifest decide.
struct Run<'a> {
    opts: &'a BundleOptions,
    manifest: BundleManifest,
    format: Format,
    verity: bool,
    cache: BlobCache,
    registries: Arc<Registries>,
}

impl<'a> Run<'a> {
    /// Reads and validates the manifest (before any network traffic), opens
    /// the cache and sets up the registry clients.
    fn open(opts: &'a BundleOptions) -> Result<Self, BundleError> {
        let strict = Strictness { allow_unpinned: opts.allow_unpinned };
        let manifest = BundleManifest::load(&opts.manifest, strict)?;
        let format = opts.format.unwrap_or(manifest.format);
        let verity = opts.verity || manifest.verity;
        let cache = BlobCache::open(&opts.cache)?;
        let registries = Registries::new(&manifest.registries, DockerConfig::from_env().map_err(ResolveError::from)?)?;
        Ok(Run { opts, manifest, format, verity, cache, registries: Arc::new(registries) })
    }

    fn progress(&self) -> Progress {
        self.opts.progress
    }

    /// The partition image: `<out>/preseed.<format>`.
    fn partition(&self) -> PathBuf {
        self.opts.out.join(format!("preseed.{}", self.format.extension()))
    }

    /// Where the partition is written before it is put in place.
    fn staging(&self) -> PathBuf {
        self.opts.out.join(format!(".preseed.{}.partial", self.format.extension()))
    }
}

/// Creates `out` and locks it for this run, then removes what killed runs
/// left there: writers' temp files and staged images (never renamed, so
/// never mistaken for a partition).
fn lock_out(out: &Path) -> Result<std::fs::File, BundleError> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let path = out.join(LOCK_FILE);
    let file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io_err(&path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(BundleError::Busy { out: out.to_path_buf(), lock: path }),
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&path)(e)),
    }
    for entry in std::fs::read_dir(out).map_err(io_err(out))? {
        let entry = entry.map_err(io_err(out))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = name.starts_with(".preseed-erofs-")
            || name.starts_with(".preseed-squashfs.")
            || (name.starts_with(".preseed.") && name.ends_with(".partial"))
            || (name.starts_with(".preseed") && name.ends_with(".tmp"));
        if stale {
            std::fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
        }
    }
    Ok(file)
}

/// Writes a small file beside the partition whole or not at all: a temp
/// file, fsync, rename.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), BundleError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(io_err(path))
}

/// An image with everything needed to plan its tarball.
struct Planned {
    entry: ImageEntry,
    resolved: ResolvedImage,
    /// What refers to it, carried in its tarball (their blobs are in `resolved.blobs`).
    referrers: Vec<IndexedReferrer>,
}

/// Stage 3: every image's tarball, planned from the descriptors alone (so
/// no blob bytes are needed yet), and what the signature policy found.
struct Plan {
    images: Vec<Planned>,
    signed: Vec<Option<SignedBy>>,
    tarballs: Arc<Vec<(TarballSpec, PlannedFile)>>,
}

impl Plan {
    fn new(images: Vec<Planned>, signed: Vec<Option<SignedBy>>, cache: &BlobCache) -> Plan {
        let tarballs = images
            .iter()
            .map(|img| {
                let e = &img.entry;
                let spec = TarballSpec {
                    name: e.reference.name(),
                    tag: e.reference.tag.clone(),
                    extra_names: e.names.clone(),
                    root: img.resolved.root.clone(),
                    blobs: img.resolved.blobs.clone(),
                };
                let file = layout::plan_tarball(&spec, cache);
                (spec, file)
            })
            .collect();
        Plan { images, signed, tarballs: Arc::new(tarballs) }
    }

    /// The partition's tree (every tarball and `preseed.json`) and its index,
    /// given each tarball's sha256.
    fn assemble(&self, sums: Vec<Digest>, format: Format) -> (Tree, PartitionIndex) {
        let mut tree = Tree::default();
        let mut indexed = Vec::new();
        let tarballs = self.images.iter().zip(self.tarballs.iter()).zip(sums).zip(&self.signed);
        for (((img, (spec, file)), sha256), signed_by) in tarballs {
            let e = &img.entry;
            indexed.push(IndexedImage {
                namespace: e.namespace.clone(),
                file: e.file.clone(),
                path: e.tarball_path(),
                name: spec.name.clone(),
                names: e.names.clone(),
                digest: spec.root.digest.clone(),
                media_type: spec.root.media_type.clone(),
                platforms: img.resolved.platforms.iter().map(|p| p.to_string()).collect(),
                pin: e.pin,
                sandbox: e.sandbox,
                boot: e.boot,
                size: file.len(),
                sha256,
                signed_by: signed_by.clone(),
                blobs: spec.blobs.iter().map(|b| IndexedBlob { digest: b.digest.clone(), size: b.size }).collect(),
                referrers: img.referrers.clone(),
            });
            tree.insert_file(&e.tarball_path(), file.clone());
        }
        // squashfs cannot share blocks between files: it would store every blob twice.
        if format == Format::Erofs {
            tree.insert_content_store();
        }
        let index = PartitionIndex {
            version: INDEX_VERSION,
            images: indexed,
            build: BuildInfo { tool: format!("preseed {}", env!("CARGO_PKG_VERSION")), format: format.to_string() },
            verity: None,
        };
        tree.insert_file(INDEX_FILE, PlannedFile::from_bytes(index.to_json()));
        (tree, index)
    }
}

/// Runs the whole build side. A damaged cache blob is found before the
/// partition is put in place: it is evicted and, online, the run starts over
/// and fetches it again (once); `--offline`, the run fails and says which.
pub async fn bundle(opts: &BundleOptions) -> Result<BundleSummary, BundleError> {
    let start = Instant::now();
    match bundle_once(opts, start).await {
        Err(BundleError::Damaged { blobs, .. }) if !opts.offline => {
            for b in &blobs {
                opts.progress.line(&format!(
                    "cache blob {} was damaged ({}); fetching it again for {}",
                    b.digest,
                    b.problem,
                    b.images.join(", ")
                ));
            }
            bundle_once(opts, start).await
        }
        other => other,
    }
}

async fn bundle_once(opts: &BundleOptions, start: Instant) -> Result<BundleSummary, BundleError> {
    let run = Run::open(opts)?;
    let images = gather::images(&run).await?;
    let to_check: Vec<_> = images.iter().map(|i| (&i.entry, &i.resolved.root.digest)).collect();
    let signed = crate::build::verify::check_images(&run.registries, &to_check, &run.cache, opts.offline).await?;
    let plan = Plan::new(images, signed, &run.cache);
    // Nothing is written before the policy is satisfied; from here on, this
    // run owns `--out`.
    let _lock = lock_out(&opts.out)?;
    let fetched = fetch::missing_blobs(&run, &plan).await?;
    let (unique_bytes, downloaded_bytes) = (fetched.unique_bytes, fetched.downloaded_bytes);
    let written = write::partition(&run, &plan, fetched)?;
    write::index_beside(&run, &written)?;
    Ok(BundleSummary {
        partition: written.partition,
        format: run.format,
        images: plan.images.len(),
        unique_bytes,
        downloaded_bytes,
        partition_bytes: written.bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}
