//! `preseed pull REF --to TARGET [--from CURRENT]`: rebuilds a released
//! partition (published by `preseed push`, format in
//! [`crate::partition::release`]) byte for byte, moving only what the node
//! lacks.
//!
//! In order: the release manifest and its plan (`fetch.rs`); every blob the
//! current partition holds is taken from it, the others fetched into the
//! work directory, verified (`fetch.rs`); the rest is unpacked into the
//! gaps and each blob copied to its pieces while it is hashed once more
//! (`write.rs`); the verity tree is rebuilt; the image read back must hash
//! to what the release recorded, and only then is it put in place.
//!
//! The one command of the node wing that talks to a registry: it fetches by
//! digest what a release names, and with a pinned reference and everything
//! local it talks to none.

mod fetch;
mod write;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use self::fetch::{Remote, Work};
use self::write::Target;
use crate::digest::{Digest, Hasher};
use crate::distribution::auth::AuthError;
use crate::node::read::archive::Archive;
use crate::node::read::open::{self, OpenError, Source};
use crate::node::read::source::{self, SourceError};
use crate::node::sys::Sys;
use crate::partition::release::{Plan, PlanError, ARTIFACT_TYPE, PLAN_MEDIA_TYPE, REST_MEDIA_TYPE};

/// What to pull, and where to.
#[derive(Clone, Debug)]
pub struct PullOptions {
    /// `registry/repository:tag` or `…@sha256:<hex>`.
    pub reference: String,
    /// The image file or block device to write.
    pub target: PathBuf,
    /// The partition the node runs now (an image file, device or directory).
    pub from: Option<PathBuf>,
    /// Where blobs wait between runs; default `<TARGET>.pull`, or
    /// `/var/cache/preseed/pull` for a device.
    pub work: Option<PathBuf>,
    /// Plain HTTP.
    pub insecure: bool,
    /// Draw a progress bar (stderr is a terminal).
    pub progress: bool,
}

/// What a pull did, and the proof of what it wrote.
#[derive(Clone, Debug, Serialize)]
pub struct PullReport {
    /// The reference pulled.
    pub reference: String,
    /// The release manifest's digest.
    pub digest: Digest,
    /// What was written.
    pub target: PathBuf,
    /// Bytes by where they came from.
    pub bytes: ByteCounts,
    /// Blobs by where they came from.
    pub blobs: BlobCounts,
    /// What the written image was proven to be.
    pub proof: Proof,
}

/// Bytes by origin.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ByteCounts {
    /// Blob bytes read from `--from`.
    pub reused: u64,
    /// Blob bytes downloaded by this run.
    pub fetched: u64,
    /// Blob bytes an earlier, interrupted run had already downloaded.
    pub skipped: u64,
    /// Manifest, plan and rest bytes downloaded.
    pub plan: u64,
}

/// Blobs by origin.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct BlobCounts {
    /// Taken from `--from`.
    pub reused: u64,
    /// Downloaded.
    pub fetched: u64,
    /// Already in the work directory.
    pub skipped: u64,
    /// Downloaded bytes (or `--from` bytes) that did not match, fetched again.
    pub refetched: u64,
}

/// The written image's size, sha256 and verity root hash, each equal to
/// what the release recorded.
#[derive(Clone, Debug, Serialize)]
pub struct Proof {
    /// Bytes.
    pub size: u64,
    /// sha256 of the image as read back.
    pub sha256: Digest,
    /// Root hash of the rebuilt verity tree.
    pub root_hash: Option<String>,
}

/// Running tallies of one pull.
#[derive(Default)]
struct Counts {
    fetched: u64,
    fetched_bytes: u64,
    skipped: u64,
    skipped_bytes: u64,
    refetched: u64,
}

/// Why a pull failed. Nothing was put in place.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The reference does not parse.
    #[error("{reference}: not a release reference ({message}); give registry/repository:tag or …@sha256:<hex>")]
    Reference {
        /// As given.
        reference: String,
        /// Why.
        message: String,
    },
    /// Credentials could not be read.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The registry refused or failed.
    #[error("pulling {reference}: {what}: {message}")]
    Registry {
        /// The release.
        reference: String,
        /// Which step.
        what: String,
        /// The error and its causes.
        message: String,
    },
    /// The reference names something else.
    #[error("{reference} is not a preseed release: {why} (push one with `preseed push`)")]
    NotRelease {
        /// The reference.
        reference: String,
        /// What it is instead.
        why: String,
    },
    /// The plan cannot be used.
    #[error("{reference}: {source}")]
    Plan {
        /// The release.
        reference: String,
        /// Why.
        source: PlanError,
    },
    /// A blob's bytes never matched its digest.
    #[error("{reference}: blob {digest} arrived as {found} twice: the registry (or something between) serves other bytes; nothing was written")]
    BadBlob {
        /// The release.
        reference: String,
        /// The blob.
        digest: Digest,
        /// What the bytes hashed to.
        found: Digest,
    },
    /// The work directory.
    #[error("{path}: {source}")]
    Work {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Another pull uses the work directory.
    #[error("{0}: another preseed pull is using this work directory")]
    Busy(PathBuf),
    /// The target.
    #[error("{path}: {source}")]
    Target {
        /// The target.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The device cannot hold the image.
    #[error("{path}: {capacity} bytes, the release's image needs {size}")]
    TooSmall {
        /// The device.
        path: PathBuf,
        /// Its size.
        capacity: u64,
        /// The image's.
        size: u64,
    },
    /// `--from` could not be opened.
    #[error("--from {path}: {source}")]
    Open {
        /// As given.
        path: PathBuf,
        /// Why.
        source: OpenError,
    },
    /// `--from` could not be listed.
    #[error("--from {path}: {source}")]
    Source {
        /// As given.
        path: PathBuf,
        /// Why.
        source: SourceError,
    },
    /// `--from` is the target.
    #[error("{0}: --from and --to are the same; pull into the other slot")]
    SameTarget(PathBuf),
    /// The written image is not the release's.
    #[error(
        "{target}: the written image is {found}, the release recorded {expected}; \
         it was not put in place (run the pull again; if it repeats, report it with both preseed versions)"
    )]
    Proof {
        /// The target.
        target: PathBuf,
        /// What the release says.
        expected: String,
        /// What was written.
        found: String,
    },
}

/// Where a blob's bytes can be read in the current partition.
#[derive(Clone)]
struct Local {
    file: Arc<File>,
    offset: u64,
    size: u64,
}

/// Pulls a release into `opts.target`.
pub async fn pull(opts: &PullOptions, sys: Arc<dyn Sys>) -> Result<PullReport, PullError> {
    let mut remote = Remote::new(&opts.reference, opts.insecure)?;
    if let Some(from) = &opts.from {
        let same =
            std::fs::canonicalize(from).ok().filter(|f| std::fs::canonicalize(&opts.target).ok().as_ref() == Some(f));
        if same.is_some() {
            return Err(PullError::SameTarget(opts.target.clone()));
        }
    }
    let work = Work { dir: opts.work.clone().unwrap_or_else(|| default_work(&opts.target)) };
    work.create()?;
    let lock_path = work.dir.join("lock");
    let lock = File::create(&lock_path).map_err(|source| PullError::Work { path: lock_path.clone(), source })?;
    if !sys.try_lock(&lock).map_err(|source| PullError::Work { path: lock_path, source })? {
        return Err(PullError::Busy(work.dir.clone()));
    }

    // The manifest, the plan and the rest.
    let mut plan_counts = Counts::default();
    let mut plan_bytes = 0;
    let (digest, manifest) = remote.manifest(&work, &mut plan_bytes).await?;
    let not_release = |why: String| PullError::NotRelease { reference: opts.reference.clone(), why };
    if manifest.config.media_type != PLAN_MEDIA_TYPE {
        return Err(not_release(format!(
            "artifact type {}, config {}",
            manifest.artifact_type.as_deref().unwrap_or("none"),
            manifest.config.media_type
        )));
    }
    if manifest.artifact_type.as_deref().is_some_and(|t| t != ARTIFACT_TYPE) {
        return Err(not_release(format!("artifact type {}", manifest.artifact_type.unwrap_or_default())));
    }
    let plan_err = |source| PullError::Plan { reference: opts.reference.clone(), source };
    if manifest.config.size > crate::partition::release::MAX_PLAN_BYTES {
        return Err(plan_err(PlanError::Malformed(format!("{} bytes", manifest.config.size))));
    }
    let plan_path =
        remote.blob(&work, &manifest.config.digest, manifest.config.size, &mut plan_counts, &|_| {}).await?;
    let plan_raw = std::fs::read(&plan_path).map_err(|source| PullError::Work { path: plan_path, source })?;
    let plan = Plan::parse(&plan_raw).map_err(plan_err)?;
    let (Some(image), Some(rest)) = (plan.image.clone(), plan.rest.clone()) else {
        return Err(plan_err(PlanError::Inconsistent("no image proof or rest: not a pushed plan".into())));
    };
    let layers: HashMap<&Digest, u64> = manifest.layers.iter().map(|l| (&l.digest, l.size)).collect();
    let listed = |d: &Digest, size: u64| layers.get(d) == Some(&size);
    if !listed(&rest.digest, rest.size)
        || manifest.layers.iter().find(|l| l.digest == rest.digest).is_some_and(|l| l.media_type != REST_MEDIA_TYPE)
        || !plan.blobs.iter().all(|b| listed(&b.digest, b.size))
    {
        return Err(plan_err(PlanError::Inconsistent("the manifest's layers are not the plan's blobs".into())));
    }
    let rest_path = remote.blob(&work, &rest.digest, rest.size, &mut plan_counts, &|_| {}).await?;
    plan_bytes += plan_counts.fetched_bytes;

    // What the current partition has (kept mounted until the end).
    let (_opened, local) = match &opts.from {
        Some(from) => {
            let (opened, local) = index_current(from, sys.clone())?;
            (Some(opened), local)
        }
        None => (None, HashMap::new()),
    };

    let progress = Bar::new(opts.progress, plan.image_bytes());
    let mut counts = Counts::default();
    let mut sources: Vec<Option<PathBuf>> = vec![None; plan.blobs.len()];
    let mut reused = (0u64, 0u64);
    // Blobs the current partition lacks, fetched first: the network is the
    // slow part, and a kill here loses nothing fetched.
    for (i, blob) in plan.blobs.iter().enumerate() {
        if local.get(&blob.digest).is_some_and(|l| l.size == blob.size) {
            continue;
        }
        let fetched = remote.blob(&work, &blob.digest, blob.size, &mut counts, &|n| progress.inc(n)).await?;
        sources[i] = Some(fetched);
    }

    let target = Target::open(&opts.target, image.size)?;
    progress.message("writing");
    unpack_rest(&rest_path, &plan, &target).map_err(|e| match e {
        Step::Io(source) => PullError::Work { path: rest_path.clone(), source },
        Step::Pull(e) => e,
    })?;
    // Every blob, hashed as it is copied to its pieces. A current-partition
    // blob that does not match is fetched and copied again.
    let order: Vec<usize> = (0..plan.blobs.len()).collect();
    let copied = crate::parallel::map(
        &order,
        |&i| plan.blobs[i].size,
        |&i| {
            let blob = &plan.blobs[i];
            let result = match &sources[i] {
                Some(path) => File::open(path).map_err(Step::Io).and_then(|f| copy_blob(&plan, i, &f, 0, &target)),
                None => {
                    let l = &local[&blob.digest];
                    copy_blob(&plan, i, &l.file, l.offset, &target)
                }
            };
            progress.inc(if sources[i].is_some() { 0 } else { blob.size });
            result
        },
    );
    for (i, result) in copied.into_iter().enumerate() {
        let blob = &plan.blobs[i];
        match result {
            Ok(true) => {
                if sources[i].is_none() {
                    reused.0 += 1;
                    reused.1 += blob.size;
                }
            }
            Ok(false) => {
                // Wrong bytes: from --from, fetch it; from the work
                // directory (changed since it was verified), fetch again.
                counts.refetched += 1;
                if let Some(p) = &sources[i] {
                    let _ = std::fs::remove_file(p);
                }
                let path = remote.blob(&work, &blob.digest, blob.size, &mut counts, &|_| {}).await?;
                let f = File::open(&path).map_err(|source| PullError::Work { path: path.clone(), source })?;
                match copy_blob(&plan, i, &f, 0, &target) {
                    Ok(true) => {}
                    Ok(false) => {
                        let found = fetch::hash_file(&path).unwrap_or_else(|_| Digest::of(b""));
                        return Err(PullError::BadBlob {
                            reference: opts.reference.clone(),
                            digest: blob.digest.clone(),
                            found,
                        });
                    }
                    Err(Step::Io(source)) => return Err(PullError::Work { path, source }),
                    Err(Step::Pull(e)) => return Err(e),
                }
                sources[i] = Some(path);
            }
            Err(Step::Io(source)) => {
                let path = sources[i].clone().or_else(|| opts.from.clone()).unwrap_or_default();
                return Err(PullError::Work { path, source });
            }
            Err(Step::Pull(e)) => return Err(e),
        }
    }

    // The proof, then the image in place.
    progress.message("proving");
    let root_hash = target.verity(&plan)?;
    if let (Some(found), Some(v)) = (&root_hash, &plan.verity) {
        if found != &v.root_hash {
            return Err(PullError::Proof {
                target: opts.target.clone(),
                expected: format!("root hash {}", v.root_hash),
                found: format!("root hash {found}"),
            });
        }
    }
    let sha256 = target.digest(image.size)?;
    if sha256 != image.sha256 {
        return Err(PullError::Proof {
            target: opts.target.clone(),
            expected: image.sha256.to_string(),
            found: sha256.to_string(),
        });
    }
    target.commit()?;
    progress.finish();
    // Fetched blobs are not needed again (the manifest, plan and rest stay:
    // a rerun of this release with everything local needs no registry).
    for path in sources.iter().flatten() {
        let _ = std::fs::remove_file(path);
    }
    Ok(PullReport {
        reference: opts.reference.clone(),
        digest,
        target: opts.target.clone(),
        bytes: ByteCounts {
            reused: reused.1,
            fetched: counts.fetched_bytes,
            skipped: counts.skipped_bytes,
            plan: plan_bytes,
        },
        blobs: BlobCounts {
            reused: reused.0,
            fetched: counts.fetched,
            skipped: counts.skipped,
            refetched: counts.refetched,
        },
        proof: Proof { size: image.size, sha256, root_hash },
    })
}

/// The work directory next to a file target; a fixed one for a device.
fn default_work(target: &Path) -> PathBuf {
    let device = std::fs::metadata(target).map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()));
    if device.unwrap_or(false) {
        return PathBuf::from("/var/cache/preseed/pull");
    }
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    target.with_file_name(format!("{name}.pull"))
}

/// Opens the current partition and finds every blob in its tarballs.
fn index_current(from: &Path, sys: Arc<dyn Sys>) -> Result<(open::Opened, HashMap<Digest, Local>), PullError> {
    // A bundle's output directory stands for the image in it.
    let bundled = from.join(format!("preseed.{}", crate::partition::Format::Erofs.extension()));
    let source = if from.is_dir() && bundled.is_file() { Source::Image(bundled) } else { Source::detect(from) };
    let opened =
        open::open_with(&source, sys).map_err(|source| PullError::Open { path: from.to_path_buf(), source })?;
    let listing =
        source::list(opened.root()).map_err(|source| PullError::Source { path: from.to_path_buf(), source })?;
    let mut local = HashMap::new();
    for image in &listing.images {
        // A tarball that does not open is simply not a source: its blobs
        // are fetched.
        let Ok(archive) = Archive::open(&image.path) else { continue };
        if archive.was_compressed() {
            continue;
        }
        for (name, entry) in archive.entries() {
            let Some(hex) = name.strip_prefix("blobs/sha256/") else { continue };
            let Ok(digest) = format!("sha256:{hex}").parse::<Digest>() else { continue };
            local.entry(digest).or_insert_with(|| Local {
                file: archive.file().clone(),
                offset: entry.offset,
                size: entry.size,
            });
        }
    }
    Ok((opened, local))
}

/// An I/O error of a step (the caller names the file) or a pull error.
enum Step {
    Io(io::Error),
    Pull(PullError),
}

impl From<PullError> for Step {
    fn from(e: PullError) -> Step {
        Step::Pull(e)
    }
}

/// Fills every gap between pieces from the rest, in image order.
fn unpack_rest(rest: &Path, plan: &Plan, target: &Target) -> Result<(), Step> {
    let file = File::open(rest).map_err(Step::Io)?;
    let mut decoder = zstd::stream::read::Decoder::new(file).map_err(Step::Io)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut fill = |from: u64, to: u64| -> Result<(), Step> {
        let mut at = from;
        while at < to {
            let n = buf.len().min((to - at) as usize);
            decoder.read_exact(&mut buf[..n]).map_err(Step::Io)?;
            target.write_at(&buf[..n], at)?;
            at += n as u64;
        }
        Ok(())
    };
    let mut at = 0;
    for piece in &plan.pieces {
        fill(at, piece.at)?;
        at = piece.at + piece.len;
    }
    fill(at, plan.data_bytes)?;
    let mut extra = [0u8; 1];
    if decoder.read(&mut extra).map_err(Step::Io)? != 0 {
        return Err(Step::Io(io::Error::other("the rest holds more bytes than the plan leaves")));
    }
    Ok(())
}

/// Reads blob `i` whole from `file` at `offset`, hashing it, and writes its
/// pieces; false (nothing to trust) if it does not hash to its digest.
fn copy_blob(plan: &Plan, i: usize, file: &File, offset: u64, target: &Target) -> Result<bool, Step> {
    let blob = &plan.blobs[i];
    let pieces: Vec<_> = plan.pieces.iter().filter(|p| p.blob as usize == i).collect();
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < blob.size {
        let n = buf.len().min((blob.size - at) as usize);
        file.read_exact_at(&mut buf[..n], offset + at).map_err(Step::Io)?;
        h.update(&buf[..n]);
        let end = at + n as u64;
        for p in &pieces {
            let (from, to) = (p.from.max(at), (p.from + p.len).min(end));
            if from < to {
                target.write_at(&buf[(from - at) as usize..(to - at) as usize], p.at + (from - p.from))?;
            }
        }
        at = end;
    }
    Ok(h.finish() == blob.digest)
}

/// A byte bar on a terminal; nothing otherwise.
struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    fn new(on: bool, total: u64) -> Bar {
        Bar(on.then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{msg:>9} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message("fetching");
            bar
        }))
    }

    fn inc(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }

    fn message(&self, m: &'static str) {
        if let Some(b) = &self.0 {
            b.set_message(m);
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}
