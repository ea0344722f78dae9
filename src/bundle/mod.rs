//! `preseed bundle`: the build-side pipeline, in order —
//! manifest → resolve (or build in-tree) → plan one tarball per image →
//! fetch into the cache (each tarball hashed for `preseed.json` as soon as
//! its last blob is in, while the other downloads go on) → write the
//! partition and `preseed.json`.

mod progress;

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures_util::stream::{self, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::build::{self, BuildError, BuildOptions};
use crate::digest::{Digest, Hasher};
use crate::fetch::cache::{BlobCache, CacheError};
pub use crate::human::human_bytes;
use crate::layout::{self, TarballSpec};
use crate::manifest::{BundleManifest, ImageEntry, ImageSource, ManifestError, Strictness};
use crate::oci::Descriptor;
use crate::partition::index::{BuildInfo, IndexedBlob, IndexedImage, PartitionIndex, INDEX_FILE, INDEX_VERSION};
use crate::partition::tree::{PlannedFile, Tree};
use crate::partition::{erofs, squashfs, Format};
use crate::resolve::auth::DockerConfig;
use crate::resolve::{resolve_image, Registries, ResolveError, ResolvedImage};
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
    Verify(#[from] crate::verify::VerifyError),
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
    /// Other I/O, with the path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
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

/// An image with everything needed to plan its tarball.
struct Planned {
    entry: ImageEntry,
    resolved: ResolvedImage,
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
    let strict = Strictness { allow_unpinned: opts.allow_unpinned };
    let manifest = BundleManifest::load(&opts.manifest, strict)?;
    let format = opts.format.unwrap_or(manifest.format);
    let verity = opts.verity || manifest.verity;
    let cache = BlobCache::open(&opts.cache)?;
    let registries = Registries::new(&manifest.registries, DockerConfig::from_env().map_err(ResolveError::from)?)?;
    let progress = &opts.progress;

    // 1. Resolve every remote image (manifests only) and build in-tree ones.
    let mut images = Vec::new();
    for entry in &manifest.images {
        let resolved = match &entry.source {
            ImageSource::Remote => {
                let mut entry = entry.clone();
                if entry.reference.digest.is_none() {
                    // Only reachable with --allow-unpinned.
                    let d = registries.resolve_tag(&entry.label(), &entry.reference).await?;
                    entry.reference = entry.reference.with_digest(d);
                }
                let resolved = resolve_image(&registries, &entry, &cache, opts.offline).await?;
                images.push(Planned { entry, resolved });
                continue;
            }
            ImageSource::Build(package) => {
                let workspace = match &opts.workspace {
                    Some(w) => w.clone(),
                    None => opts.manifest.parent().unwrap_or(Path::new(".")).to_path_buf(),
                };
                let workspace_manifest = workspace.join("Cargo.toml");
                if !workspace_manifest.is_file() {
                    return Err(BundleError::NoWorkspace { image: entry.label(), manifest: workspace_manifest });
                }
                // Built in <workspace>/target/preseed-images, apart from normal builds.
                let mut build_opts = BuildOptions::new(workspace_manifest);
                build_opts.offline = opts.offline;
                progress.line(&format!("building {} from package {package}", entry.label()));
                let built = build::build_image(package, &cache, &build_opts)?;
                ResolvedImage { root: built.root, blobs: built.blobs, platforms: vec![built.platform] }
            }
        };
        images.push(Planned { entry: entry.clone(), resolved });
    }

    // Signatures ([verify]) before any blob is downloaded or anything written.
    let to_check: Vec<_> = images.iter().map(|i| (&i.entry, &i.resolved.root.digest)).collect();
    let signed = crate::verify::check_images(&registries, &to_check, &cache, opts.offline).await?;

    // 2. Plan the tree: one tarball per image (offsets come from the
    // descriptors alone, so this needs no blob bytes yet).
    let planned: Vec<(TarballSpec, PlannedFile)> = images
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
            let file = layout::plan_tarball(&spec, &cache);
            (spec, file)
        })
        .collect();
    let planned = Arc::new(planned);
    let sums_store = Arc::new(TarballSums::open(&cache));
    let mut sums = SumQueue::new(planned.clone(), sums_store.clone());

    // 3. Fetch every missing blob once, concurrently, whichever image needs
    // it; each tarball is hashed as soon as its last blob is in the cache,
    // while the other downloads go on.
    let mut missing: BTreeMap<Digest, (usize, Descriptor)> = BTreeMap::new();
    let mut unique: HashMap<Digest, u64> = HashMap::new();
    for (i, img) in images.iter().enumerate() {
        for blob in &img.resolved.blobs {
            unique.insert(blob.digest.clone(), blob.size);
            if !cache.contains(&blob.digest, blob.size) {
                missing.entry(blob.digest.clone()).or_insert((i, blob.clone()));
            }
        }
    }
    let unique_bytes: u64 = unique.values().sum();
    if opts.offline {
        if let Some((d, (i, _))) = missing.iter().next() {
            return Err(ResolveError::NotCached {
                image: images[*i].entry.label(),
                digest: d.clone(),
                cache: cache.root().display().to_string(),
            }
            .into());
        }
    }
    let downloaded_bytes: u64 = missing.values().map(|(_, d)| d.size).sum();
    std::fs::create_dir_all(&opts.out).map_err(io_err(&opts.out))?;
    let staging = opts.out.join(format!(".preseed.{}.partial", format.extension()));
    // An erofs image's blocks follow from the plan, so each downloaded blob
    // goes into the image as soon as it is verified; only `preseed.json`
    // waits for the tarball sums (a stand-in of the same length holds its
    // place until then).
    let staged = match format {
        Format::Erofs if !missing.is_empty() => {
            let stand_in: Vec<Digest> =
                (0..planned.len()).map(|i| Digest::of(format!("preseed stand-in sum {i}").as_bytes())).collect();
            let (provisional, _) = assemble(&images, &planned, stand_in, &signed, format);
            let staged = erofs::Staged::new(&provisional, &staging)
                .map_err(|source| BundleError::Erofs { path: staging.clone(), source })?;
            Some(Arc::new(staged))
        }
        _ => None,
    };
    let mut placing = tokio::task::JoinSet::new();
    // How many blobs each tarball still waits for, and who waits for each.
    let mut waiting = vec![0usize; planned.len()];
    let mut waiters: HashMap<&Digest, Vec<usize>> = HashMap::new();
    for (i, (spec, _)) in planned.iter().enumerate() {
        for b in spec.blobs.iter().filter(|b| missing.contains_key(&b.digest)) {
            waiting[i] += 1;
            waiters.entry(&b.digest).or_default().push(i);
        }
        if waiting[i] == 0 {
            sums.start(i);
        }
    }
    if !missing.is_empty() {
        let bar = progress.bytes("downloading", downloaded_bytes);
        // One task per download, so hashing and writing use every core.
        let registries = Arc::new(registries);
        let tasks = missing.values().map(|(i, blob)| {
            let (registries, cache, bar) = (registries.clone(), cache.clone(), bar.clone());
            let (label, reference, blob) = (images[*i].entry.label(), images[*i].entry.reference.clone(), blob.clone());
            async move {
                tokio::spawn(async move {
                    registries
                        .fetch_blob(&label, &reference, &blob, &cache, &|n| bar.inc(n))
                        .await
                        .map(|()| blob.digest)
                })
                .await
                .expect("download task panicked")
            }
        });
        let mut fetched = stream::iter(tasks).buffer_unordered(opts.jobs.max(1));
        while let Some(digest) = fetched.try_next().await? {
            if let Some(staged) = &staged {
                let (staged, path, digest) = (staged.clone(), cache.path(&digest), digest.clone());
                placing.spawn_blocking(move || staged.place(&digest, &path));
            }
            for &i in waiters.get(&digest).into_iter().flatten() {
                waiting[i] -= 1;
                if waiting[i] == 0 {
                    sums.start(i);
                }
            }
        }
        bar.finish();
    }
    // Blobs downloaded in this run were hashed on the way in; every other
    // blob taken from the cache is hashed again before the partition built
    // from it is put in place (below, alongside the write).
    let unverified: Vec<Digest> = {
        let mut u: Vec<(&Digest, &u64)> = unique.iter().filter(|(d, _)| !missing.contains_key(*d)).collect();
        // Largest first, so the workers finish together.
        u.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        u.into_iter().map(|(d, _)| d.clone()).collect()
    };
    while let Some(placed) = placing.join_next().await {
        placed
            .expect("placing task panicked")
            .map_err(|source| BundleError::Erofs { path: staging.clone(), source })?;
    }
    let staged = staged.map(|s| Arc::into_inner(s).expect("every placing task has ended"));
    let sums = sums.finish().await.map_err(io_err(cache.root()))?;
    let spec_blobs: Vec<(String, Vec<Digest>)> = images
        .iter()
        .zip(planned.iter())
        .map(|(img, (spec, _))| (img.entry.label(), spec.blobs.iter().map(|b| b.digest.clone()).collect()))
        .collect();
    let sum_keys: Vec<PathBuf> = planned.iter().map(|(spec, file)| sums_store.key_path(spec, file)).collect();
    let (tree, index) = assemble(&images, &planned, sums, &signed, format);
    let index_json = index.to_json();

    // 4. Write the partition and the index beside it.
    let partition = opts.out.join(format!("preseed.{}", format.extension()));
    let mut stamp = Stamp::of(&tree, format, verity);
    let partition_bytes = match stamp.matches(&partition) {
        Some((bytes, recorded)) => {
            progress.line(&format!("{} is up to date", partition.display()));
            stamp.verity = recorded;
            bytes
        }
        None => {
            progress.line(&format!("writing {}", partition.display()));
            // Written under a staging name while the unverified blobs are
            // hashed on the other cores; renamed into place only if all match.
            let (written, damaged) = std::thread::scope(|scope| {
                let check = scope.spawn(|| cache.check(&unverified));
                let written = match format {
                    Format::Erofs => match staged {
                        Some(staged) => staged.finish(&tree),
                        None => erofs::write(&tree, &staging),
                    }
                    .map(|s| s.image_bytes)
                    .map_err(|source| BundleError::Erofs { path: partition.clone(), source }),
                    Format::Squashfs => squashfs::write(&tree, &staging)
                        .map(|s| s.image_bytes)
                        .map_err(|source| BundleError::Squashfs { path: partition.clone(), source }),
                };
                (written, check.join().expect("hashing thread panicked"))
            });
            if !damaged.is_empty() {
                let _ = std::fs::remove_file(&staging);
                let mut blobs = Vec::new();
                for (digest, problem) in damaged {
                    cache.evict(&digest)?;
                    let users: Vec<usize> =
                        (0..spec_blobs.len()).filter(|i| spec_blobs[*i].1.contains(&digest)).collect();
                    // Tarball sums computed from the damaged bytes must go too.
                    for i in &users {
                        let _ = std::fs::remove_file(&sum_keys[*i]);
                    }
                    let images = users.iter().map(|i| spec_blobs[*i].0.clone()).collect();
                    blobs.push(DamagedBlob { digest, problem, images });
                }
                return Err(BundleError::Damaged { cache: cache.root().to_path_buf(), blobs });
            }
            let bytes = match written {
                Ok(b) => b,
                Err(e) => {
                    let _ = std::fs::remove_file(&staging);
                    return Err(e);
                }
            };
            let bytes = if verity {
                // Salt and UUID from the plan: the same inputs, the same bytes.
                let salt = Digest::of(format!("preseed verity salt {}", stamp.plan).as_bytes());
                let mut salt_bytes = [0u8; 32];
                hex::decode_to_slice(salt.hex(), &mut salt_bytes)
                    .map_err(|e| io_err(&staging)(std::io::Error::other(e)))?;
                let mut uuid = [0u8; 16];
                uuid.copy_from_slice(&salt_bytes[16..]);
                let info = crate::partition::verity::append(&staging, &salt_bytes, &uuid).map_err(io_err(&staging))?;
                stamp.verity = Some(info);
                std::fs::metadata(&staging).map_err(io_err(&staging))?.len()
            } else {
                bytes
            };
            std::fs::rename(&staging, &partition).map_err(io_err(&partition))?;
            stamp.record(&partition);
            bytes
        }
    };
    // The copy beside the image also says where its verity tree is.
    let outside = match &stamp.verity {
        Some(info) => PartitionIndex { verity: Some(info.clone()), ..index }.to_json(),
        None => index_json,
    };
    let index_path = opts.out.join(INDEX_FILE);
    std::fs::write(&index_path, &outside).map_err(io_err(&index_path))?;
    let roothash_path = opts.out.join("preseed.roothash");
    match &stamp.verity {
        Some(info) => {
            std::fs::write(&roothash_path, format!("{}\n", info.root_hash)).map_err(io_err(&roothash_path))?
        }
        None => match std::fs::remove_file(&roothash_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&roothash_path)(e)),
            _ => {}
        },
    }
    Ok(BundleSummary {
        partition,
        format,
        images: images.len(),
        unique_bytes,
        downloaded_bytes,
        partition_bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The partition's tree (every tarball and `preseed.json`) and its index,
/// given each tarball's sha256.
fn assemble(
    images: &[Planned],
    planned: &[(TarballSpec, PlannedFile)],
    sums: Vec<Digest>,
    signed: &[Option<crate::verify::SignedBy>],
    format: Format,
) -> (Tree, PartitionIndex) {
    let mut tree = Tree::default();
    let mut indexed = Vec::new();
    for (((img, (spec, file)), sha256), signed_by) in images.iter().zip(planned).zip(sums).zip(signed) {
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

/// What determines a partition's bytes: the format, the writer, and every
/// file's path and segments (inline bytes by hash, blobs by digest). Recorded
/// beside the image so a warm bundle with an unchanged plan skips rewriting it,
/// as make would.
#[derive(Serialize, Deserialize, PartialEq)]
struct Stamp {
    plan: Digest,
    size: u64,
    modified_ns: u128,
    /// The verity tree written after the filesystem, if any.
    #[serde(default)]
    verity: Option<crate::partition::verity::VerityInfo>,
}

impl Stamp {
    fn of(tree: &Tree, format: Format, verity: bool) -> Stamp {
        use crate::partition::tree::Segment;
        let mut h = Hasher::new();
        h.update(format!("preseed {} {format}\n", env!("CARGO_PKG_VERSION")).as_bytes());
        if verity {
            h.update(b"verity sha256 4096\n");
        }
        for (path, file) in tree.files() {
            h.update(format!("file {path}\n").as_bytes());
            for segment in &file.segments {
                let line = match segment {
                    Segment::Inline(bytes) => format!("inline {}\n", Digest::of(bytes)),
                    Segment::Zeros(n) => format!("zeros {n}\n"),
                    Segment::Blob { digest, size, .. } => format!("blob {digest} {size}\n"),
                };
                h.update(line.as_bytes());
            }
        }
        Stamp { plan: h.finish(), size: 0, modified_ns: 0, verity: None }
    }

    fn path(partition: &Path) -> PathBuf {
        let name = partition.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        partition.with_file_name(format!(".{name}.stamp"))
    }

    fn observed(&self, partition: &Path) -> Option<Stamp> {
        let meta = std::fs::metadata(partition).ok()?;
        let modified_ns = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
        Some(Stamp { plan: self.plan.clone(), size: meta.len(), modified_ns, verity: self.verity.clone() })
    }

    /// The partition's size (and its verity tree) if it was written from
    /// this very plan and not touched since.
    fn matches(&self, partition: &Path) -> Option<(u64, Option<crate::partition::verity::VerityInfo>)> {
        let recorded: Stamp = serde_json::from_slice(&std::fs::read(Self::path(partition)).ok()?).ok()?;
        let observed = Stamp { verity: recorded.verity.clone(), ..self.observed(partition)? };
        (recorded == observed).then_some((observed.size, recorded.verity))
    }

    /// Best effort: without a stamp the next run just rewrites the image.
    fn record(&self, partition: &Path) {
        if let Some(observed) = self.observed(partition) {
            let _ = std::fs::write(Self::path(partition), serde_json::to_vec(&observed).unwrap_or_default());
        }
    }
}

/// Tarball sums computed in the background, one per core at most, each
/// started once every blob of its tarball is in the cache.
struct SumQueue {
    planned: Arc<Vec<(TarballSpec, PlannedFile)>>,
    store: Arc<TarballSums>,
    cores: Arc<tokio::sync::Semaphore>,
    running: BTreeMap<usize, tokio::task::JoinHandle<std::io::Result<Digest>>>,
}

impl SumQueue {
    fn new(planned: Arc<Vec<(TarballSpec, PlannedFile)>>, store: Arc<TarballSums>) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        SumQueue { planned, store, cores: Arc::new(tokio::sync::Semaphore::new(cores)), running: BTreeMap::new() }
    }

    /// Starts hashing tarball `i` (its blobs are all in the cache).
    fn start(&mut self, i: usize) {
        let (planned, store, cores) = (self.planned.clone(), self.store.clone(), self.cores.clone());
        let task = tokio::spawn(async move {
            let _core = cores.acquire_owned().await.expect("semaphore never closed");
            tokio::task::spawn_blocking(move || {
                let (spec, file) = &planned[i];
                store.get_or_compute(spec, file)
            })
            .await
            .expect("tarball hashing panicked")
        });
        self.running.insert(i, task);
    }

    /// Every tarball's sum, in order.
    async fn finish(mut self) -> std::io::Result<Vec<Digest>> {
        let mut out = Vec::with_capacity(self.planned.len());
        for i in 0..self.planned.len() {
            if !self.running.contains_key(&i) {
                self.start(i);
            }
            let task = self.running.remove(&i).expect("just started");
            out.push(task.await.expect("tarball hashing task panicked")?);
        }
        Ok(out)
    }
}

/// Remembers tarball sha256s by what determines the tarball's bytes (the
/// plan: index.json and blob digests), so a warm bundle does not re-read
/// every blob to hash tarballs it has hashed before.
struct TarballSums {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct TarballSum {
    size: u64,
    sha256: Digest,
}

impl TarballSums {
    fn open(cache: &BlobCache) -> Self {
        TarballSums { dir: cache.root().join("tarballs") }
    }

    /// Where the sum of this tarball plan is remembered.
    fn key_path(&self, spec: &TarballSpec, file: &PlannedFile) -> PathBuf {
        let mut key = Hasher::new();
        key.update(&layout::index_json(spec));
        for b in &spec.blobs {
            key.update(format!("\n{} {}", b.digest, b.size).as_bytes());
        }
        key.update(format!("\nlayout v1 {}", file.len()).as_bytes());
        self.dir.join(key.finish().hex())
    }

    fn get_or_compute(&self, spec: &TarballSpec, file: &PlannedFile) -> std::io::Result<Digest> {
        let path = self.key_path(spec, file);
        if let Ok(bytes) = std::fs::read(&path) {
            if let Ok(sum) = serde_json::from_slice::<TarballSum>(&bytes) {
                if sum.size == file.len() {
                    return Ok(sum.sha256);
                }
            }
        }
        let mut h = Hasher::new();
        let mut reader = file.reader();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        let sha256 = h.finish();
        std::fs::create_dir_all(&self.dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        serde_json::to_writer(&mut tmp, &TarballSum { size: file.len(), sha256: sha256.clone() })?;
        tmp.persist(&path).map_err(|e| e.error)?;
        Ok(sha256)
    }
}
