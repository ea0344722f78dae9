//! Importing one tarball: ask containerd which blobs it has, write only the
//! missing ones (several at once, children before parents, with GC labels)
//! under a lease, optionally unpack, then create or update the image records
//! with the pin and source labels.
//!
//! The lease is only taken when something has to be written or an image
//! record has to be created or retargeted; a load that finds everything in
//! place only reads metadata.
//!
//! Before any import, [`Context::claim_placed`] registers the blobs `preseed
//! place` put in containerd's store, so that no garbage collection during
//! the load deletes them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_client::services::v1::Image;
use futures_util::{StreamExt, TryStreamExt};
use tokio::sync::{Mutex, Semaphore};

use super::containerd::{to_wire, BlobBytes, Client, Wrote};
use super::report::{millis, ImageReport, Outcome};
use super::{LoadOptions, LABEL_PINNED, LABEL_SOURCE, PINNED};
use crate::digest::Digest;
use crate::node::read::archive::Archive;
use crate::node::read::image::{self, ArchiveImage, BlobData};
use crate::node::read::source::SourceImage;

/// How long an import lease lives if the loader dies before deleting it.
const LEASE_EXPIRY: Duration = Duration::from_secs(3600);

/// Why one image failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The tarball could not be read or understood.
    #[error(transparent)]
    Image(#[from] image::ImageError),
    /// The tarball's size differs from `preseed.json`.
    #[error("tarball is {found} bytes, preseed.json says {expected}: the partition is damaged or mixed up")]
    TarballSize {
        /// From the index.
        expected: u64,
        /// On disk.
        found: u64,
    },
    /// The tarball's image is not the one `preseed.json` pins.
    #[error("tarball holds {found}, preseed.json pins {expected}")]
    RootMismatch {
        /// From the index.
        expected: String,
        /// In the tarball.
        found: String,
    },
    /// An image with no name to give it.
    #[error("no name for image {0} (no io.containerd.image.name annotation, full ref.name or RepoTags)")]
    Unnamed(String),
    /// Writing a blob failed (containerd verifies digest and size).
    #[error("writing {what} {digest}: {source}")]
    Write {
        /// Kind of blob.
        what: &'static str,
        /// Its digest.
        digest: String,
        /// What containerd or the read said.
        source: super::containerd::WriteError,
    },
    /// Another containerd call failed.
    #[error("containerd {op} {target}: {}", super::containerd::describe(status))]
    Grpc {
        /// The operation.
        op: &'static str,
        /// What it was about.
        target: String,
        /// containerd's answer.
        status: tonic::Status,
    },
    /// Unpacking failed.
    #[error("unpacking: {0}")]
    Unpack(#[from] super::unpack::UnpackError),
    /// The thread reading the tarball failed.
    #[error("reading the tarball: {0}")]
    Reader(String),
}

fn grpc(op: &'static str, target: impl ToString) -> impl FnOnce(tonic::Status) -> ImportError {
    move |status| ImportError::Grpc { op, target: target.to_string(), status }
}

/// State shared by all imports of one load.
pub struct Context {
    client: Client,
    source_id: String,
    verity: bool,
    jobs: usize,
    unpack: bool,
    unpack_boot: bool,
    snapshotter: String,
    writes: Semaphore,
    leases: Mutex<HashMap<String, String>>,
    lease_prefix: String,
    counter: AtomicU64,
    /// Blobs [`Context::claim_placed`] registered under this load's lease,
    /// by namespace and digest: their size, until an image reports them.
    claimed: std::sync::Mutex<HashMap<(String, Digest), Option<u64>>>,
}

impl Context {
    /// A context for one load.
    pub fn new(client: Client, opts: &LoadOptions, source_id: String) -> Self {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Context {
            client,
            source_id,
            verity: opts.verity_root_hash.is_some(),
            jobs: opts.jobs.max(1),
            unpack: opts.unpack,
            unpack_boot: opts.unpack_boot,
            snapshotter: opts.snapshotter.clone(),
            writes: Semaphore::new(opts.jobs.max(1)),
            leases: Mutex::new(HashMap::new()),
            lease_prefix: format!("preseed-load-{}-{nanos}", std::process::id()),
            counter: AtomicU64::new(0),
            claimed: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn unique(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    /// The namespace's import lease, created on first use.
    async fn lease(&self, ns: &str) -> Result<String, ImportError> {
        let mut leases = self.leases.lock().await;
        if let Some(id) = leases.get(ns) {
            return Ok(id.clone());
        }
        let id = self.lease_prefix.clone();
        self.client
            .lease_create(ns, &id, LEASE_EXPIRY, &super::lease::labels())
            .await
            .map_err(grpc("creating lease in", ns))?;
        leases.insert(ns.to_string(), id.clone());
        Ok(id)
    }

    /// Deletes every lease taken, waiting for the garbage collection that
    /// removes whatever no image record references (a failed image's blobs).
    pub async fn release_leases(&self) -> Result<(), tonic::Status> {
        let leases = std::mem::take(&mut *self.leases.lock().await);
        let mut first_err = None;
        for (ns, id) in leases {
            if let Err(e) = self.client.lease_delete(&ns, &id, true).await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// An image's error for the report: through dm-verity, an EIO means
    /// the partition is corrupt, and the message says so.
    fn describe(&self, e: &ImportError) -> String {
        if self.verity && crate::node::read::verity::is_eio(e) {
            format!("{e}: {}", crate::node::read::verity::CORRUPT)
        } else {
            e.to_string()
        }
    }

    /// Imports every image of one tarball; never fails as a whole.
    pub async fn import_tarball(&self, img: SourceImage) -> Vec<ImageReport> {
        let start = Instant::now();
        let failed = |names: Vec<String>, e: ImportError| ImageReport {
            namespace: img.namespace.clone(),
            tarball: img.rel.clone(),
            names,
            outcome: Outcome::Failed,
            error: Some(self.describe(&e)),
            blobs_written: 0,
            bytes_written: 0,
            blobs_placed: 0,
            bytes_placed: 0,
            unpacked: false,
            duration_ms: millis(start.elapsed()),
            signed_by: Vec::new(),
        };
        let (archive, images) = match Self::open(&img).await {
            Ok(v) => v,
            Err(e) => return vec![failed(img.names.clone(), e)],
        };
        let mut out = Vec::new();
        for ai in images {
            let started = Instant::now();
            // preseed.json's names win; the archive's own are for compat dirs.
            let names = if img.names.is_empty() { ai.names.clone() } else { img.names.clone() };
            let mut stats = Stats::default();
            let result = if names.is_empty() {
                Err(ImportError::Unnamed(ai.root.digest.to_string()))
            } else {
                self.import_image(&img, &names, &archive, &ai, &mut stats).await
            };
            out.push(ImageReport {
                namespace: img.namespace.clone(),
                tarball: img.rel.clone(),
                names,
                outcome: match &result {
                    Ok(o) => *o,
                    Err(_) => Outcome::Failed,
                },
                error: result.err().map(|e| self.describe(&e)),
                blobs_written: stats.blobs,
                bytes_written: stats.bytes,
                blobs_placed: stats.adopted,
                bytes_placed: stats.adopted_bytes,
                unpacked: stats.unpacked,
                duration_ms: millis(started.elapsed()),
                signed_by: Vec::new(),
            });
        }
        out
    }

    /// Registers, before any image is imported, every blob of `images` that
    /// containerd has no record of but whose file is in its local store
    /// (put there by `preseed place`, copied or overlaid), under this load's
    /// lease, with its labels; returns how many.
    ///
    /// Until registered, such files are fair game: a GC that removes any
    /// content record also deletes every store file no record names, and
    /// removing a stale lease runs one (as may an image that changes
    /// target). Registered up front, they stay placed for the whole load
    /// instead of being deleted and streamed again.
    ///
    /// Where nothing was placed this costs one probe: the first missing blob
    /// has no file, and no further tarball is read (boot images stay first).
    pub async fn claim_placed(&self, images: &[SourceImage]) -> Result<usize, ImportError> {
        let c = &self.client;
        // Each distinct blob of each namespace once, of the images whose
        // records are not there yet (or name another image): an image
        // loaded before has its blobs registered, and a later boot pays for
        // one record lookup per name, not one per blob.
        // Tarball by tarball, so that where nothing is placed (a streamed
        // load) only the first tarball is read before the probe says so.
        let mut seen = HashSet::new();
        let (mut leaves, mut parents) = (Vec::new(), Vec::new());
        let mut probed = false;
        for img in images {
            // A tarball that does not open fails in its own import.
            let Ok((_, ais)) = Self::open(img).await else { continue };
            let ns = img.namespace.as_str();
            let mut blobs = Vec::new();
            for ai in ais {
                let names = if img.names.is_empty() { &ai.names } else { &img.names };
                let (want, mut loaded) = (ai.root.digest.to_string(), !names.is_empty());
                for name in names {
                    let record = c.image_get(ns, name).await.map_err(grpc("image get", name))?;
                    loaded &= record.and_then(|r| r.target).is_some_and(|t| t.digest == want);
                }
                if !loaded {
                    blobs.extend(
                        ai.blobs.into_iter().filter(|b| seen.insert((ns.to_string(), b.descriptor.digest.clone()))),
                    );
                }
            }
            let known: Vec<bool> = futures_util::stream::iter(&blobs)
                .map(|b| async move {
                    let d = &b.descriptor.digest;
                    c.content_labels(ns, d).await.map(|l| l.is_some()).map_err(grpc("content info", d))
                })
                .buffered(self.jobs * 2)
                .try_collect()
                .await?;
            let mut missing = blobs.into_iter().zip(known).filter(|(_, k)| !k).map(|(b, _)| b);
            if !probed {
                // Any missing blob will do, a parent too: its GC labels may
                // name children not registered yet.
                let Some(first) = missing.next() else { continue };
                if !self.claim(ns, &first).await? {
                    return Ok(0);
                }
                probed = true;
            }
            for b in missing {
                let to = if b.is_parent() { &mut parents } else { &mut leaves };
                to.push((ns.to_string(), b));
            }
        }
        if !probed {
            return Ok(0);
        }
        let mut claimed = 1;
        let placed: Vec<bool> = futures_util::stream::iter(&leaves)
            .map(|(ns, b)| self.claim(ns, b))
            .buffer_unordered(self.jobs)
            .try_collect()
            .await?;
        claimed += placed.iter().filter(|p| **p).count();
        for (ns, b) in &parents {
            if self.claim(ns, b).await? {
                claimed += 1;
            }
        }
        Ok(claimed)
    }

    /// Registers one placed blob; false if its file is not in the store.
    async fn claim(&self, ns: &str, blob: &image::Blob) -> Result<bool, ImportError> {
        let lease = self.lease(ns).await?;
        let (wrote, size) = self.write(ns, &lease, None, blob.clone()).await?;
        let size = match wrote {
            Wrote::NotPlaced => return Ok(false),
            Wrote::Adopted => Some(size),
            // Registered meanwhile: already held by this lease, not placed by us.
            Wrote::Present | Wrote::Streamed => None,
        };
        self.claimed.lock().expect("not poisoned").insert((ns.to_string(), blob.descriptor.digest.clone()), size);
        Ok(true)
    }

    /// Whether [`Context::claim_placed`] registered this blob, and its size
    /// the first time an image asks (that image reports it as placed).
    fn claimed(&self, ns: &str, digest: &Digest) -> Option<Option<u64>> {
        let mut claimed = self.claimed.lock().expect("not poisoned");
        claimed.get_mut(&(ns.to_string(), digest.clone())).map(Option::take)
    }

    /// Opens one tarball and reads its images, checked against its index
    /// entry (the tarball's size, the image it pins).
    async fn open(img: &SourceImage) -> Result<(Archive, Vec<ArchiveImage>), ImportError> {
        let path = img.path.clone();
        let expected_size = img.size;
        let opened = tokio::task::spawn_blocking(move || -> Result<(Archive, Vec<ArchiveImage>), ImportError> {
            if let Some(expected) = expected_size {
                let found = std::fs::metadata(&path)
                    .map_err(|source| {
                        image::ImageError::from(crate::node::read::archive::ArchiveError::Io {
                            path: path.clone(),
                            source,
                        })
                    })?
                    .len();
                if found != expected {
                    return Err(ImportError::TarballSize { expected, found });
                }
            }
            let archive = Archive::open(&path).map_err(image::ImageError::from)?;
            let images = image::images(&archive)?;
            Ok((archive, images))
        })
        .await
        .unwrap_or_else(|e| Err(ImportError::Reader(e.to_string())));
        let (archive, images) = opened?;
        if let Some(expected) = &img.digest {
            // A preseed tarball holds exactly the image its index entry pins.
            let roots: Vec<String> = images.iter().map(|i| i.root.digest.to_string()).collect();
            if roots != [expected.to_string()] {
                return Err(ImportError::RootMismatch { expected: expected.to_string(), found: roots.join(", ") });
            }
        }
        Ok((archive, images))
    }

    async fn import_image(
        &self,
        img: &SourceImage,
        names: &[String],
        archive: &Archive,
        ai: &ArchiveImage,
        stats: &mut Stats,
    ) -> Result<Outcome, ImportError> {
        let ns = img.namespace.as_str();
        let c = &self.client;

        // What containerd has: blob labels (None = missing) and image records.
        let digests: Vec<_> = ai.blobs.iter().map(|b| b.descriptor.digest.clone()).collect();
        let present: Vec<Option<HashMap<String, String>>> = futures_util::stream::iter(digests)
            .map(|d| async move { c.content_labels(ns, &d).await.map_err(grpc("content info", &d)) })
            .buffered(self.jobs * 2)
            .try_collect()
            .await?;
        let mut records = Vec::new();
        for name in names {
            records.push(c.image_get(ns, name).await.map_err(grpc("image get", name))?);
        }
        let target = to_wire(&ai.root);
        // Some name has no record yet, or one pointing elsewhere.
        let retarget = records.iter().any(|r| {
            r.as_ref()
                .and_then(|i| i.target.as_ref())
                .is_none_or(|t| t.digest != target.digest || t.media_type != target.media_type || t.size != target.size)
        });
        let missing = present.iter().any(Option::is_none);
        let mut changed = false;

        // Blobs registered up front count as placed for the first image
        // naming them; this load's lease holds them already.
        let mut held = HashSet::new();
        for (b, p) in ai.blobs.iter().zip(&present) {
            let d = &b.descriptor.digest;
            if let Some(first) = p.as_ref().and_then(|_| self.claimed(ns, d)) {
                held.insert(d.clone());
                if let Some(size) = first {
                    stats.add(Wrote::Adopted, size);
                }
            }
        }

        if missing || retarget {
            let lease = self.lease(ns).await?;
            // Hold what is already there until the image record references it.
            for (b, p) in ai.blobs.iter().zip(&present) {
                if p.is_some() && !held.contains(&b.descriptor.digest) {
                    c.lease_add_content(ns, &lease, &b.descriptor.digest)
                        .await
                        .map_err(grpc("lease add", &b.descriptor.digest))?;
                }
            }
            // Leaves (layers, configs) in parallel, then parents in order:
            // a parent is committed with labels that name its children.
            let leaves: Vec<image::Blob> = ai
                .blobs
                .iter()
                .zip(&present)
                .filter(|(b, p)| p.is_none() && !b.is_parent())
                .map(|(b, _)| b.clone())
                .collect();
            let written: Vec<(Wrote, u64)> = futures_util::stream::iter(leaves)
                .map(|b| self.write(ns, &lease, Some(archive), b))
                .buffer_unordered(self.jobs)
                .try_collect()
                .await?;
            for (wrote, n) in written {
                stats.add(wrote, n);
            }
            for (b, p) in ai.blobs.iter().zip(&present) {
                if p.is_none() && b.is_parent() {
                    let (wrote, n) = self.write(ns, &lease, Some(archive), b.clone()).await?;
                    stats.add(wrote, n);
                }
            }
            changed = true;
        }
        // Parents that were there already but lack (some of) their GC labels.
        for (b, p) in ai.blobs.iter().zip(&present) {
            let Some(have) = p else { continue };
            let lacking: BTreeMap<String, String> = b
                .labels
                .iter()
                .filter(|(k, v)| have.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if !lacking.is_empty() {
                c.content_set_labels(ns, &b.descriptor.digest, &lacking)
                    .await
                    .map_err(grpc("content update", &b.descriptor.digest))?;
                changed = true;
            }
        }

        if self.unpack || (self.unpack_boot && img.boot) {
            let (c, sn) = (&self.client, self.snapshotter.as_str());
            if let Some(plan) = super::unpack::plan(c, ns, sn, archive, ai).await? {
                let lease = self.lease(ns).await?;
                let key_prefix = format!("extract-{}-{}", std::process::id(), self.unique());
                super::unpack::apply(c, ns, sn, &lease, &key_prefix, plan).await?;
                stats.unpacked = true;
            }
            changed |= stats.unpacked;
        }

        // Every record, or none: a failure part-way (a name containerd
        // refuses, a lost connection) undoes the records already made, so a
        // failed image leaves no record and no pin behind.
        let mut created = false;
        let mut done: Vec<(&str, Option<Image>)> = Vec::new();
        for (name, record) in names.iter().zip(records) {
            match self.put_record(ns, name, img.pin, &target, record.clone()).await {
                Ok(Record::Unchanged) => {}
                Ok(Record::Created) => {
                    created = true;
                    done.push((name, None));
                }
                Ok(Record::Updated) => {
                    changed = true;
                    done.push((name, record));
                }
                Err(e) => {
                    self.undo_records(ns, done).await;
                    return Err(e);
                }
            }
        }
        Ok(if stats.blobs > 0 || stats.adopted > 0 || created || retarget {
            Outcome::Imported
        } else if changed {
            Outcome::Updated
        } else {
            Outcome::AlreadyPresent
        })
    }

    /// Writes one blob (or registers its placed file); says which, with its
    /// size. With no archive, only a placed file is registered.
    async fn write(
        &self,
        ns: &str,
        lease: &str,
        archive: Option<&Archive>,
        blob: image::Blob,
    ) -> Result<(Wrote, u64), ImportError> {
        let _permit = self.writes.acquire().await.expect("semaphore never closed");
        let d = &blob.descriptor;
        let bytes = archive.map(|archive| match &blob.data {
            BlobData::Entry(e) => BlobBytes::File { file: archive.file().clone(), offset: e.offset },
            BlobData::Inline(b) => BlobBytes::Memory(b.clone()),
        });
        // Unique per write: two images sharing a blob may write it at once.
        let reference = format!("{}-{}-{}", self.lease_prefix, self.unique(), &d.digest.hex()[..12]);
        let what = if blob.is_parent() {
            "manifest"
        } else if d.media_type.contains("config") {
            "config"
        } else {
            "layer"
        };
        let wrote = self
            .client
            .write_blob(ns, lease, reference, d, bytes, &blob.labels)
            .await
            .map_err(|source| ImportError::Write { what, digest: d.digest.to_string(), source })?;
        Ok((wrote, d.size))
    }

    /// Puts records back as they were before this image: deletes those it
    /// created, restores those it changed. Best effort: with containerd gone
    /// there is nothing to do, and the next load imports the image again.
    async fn undo_records(&self, ns: &str, done: Vec<(&str, Option<Image>)>) {
        for (name, before) in done.into_iter().rev() {
            let _ = match before {
                None => self.client.image_delete(ns, name).await,
                Some(before) => {
                    let paths = vec!["target".to_string(), "labels".to_string()];
                    self.client.image_update(ns, before, paths).await
                }
            };
        }
    }

    /// Creates or updates one image record: target, pin, source label.
    async fn put_record(
        &self,
        ns: &str,
        name: &str,
        pin: bool,
        target: &containerd_client::types::Descriptor,
        existing: Option<Image>,
    ) -> Result<Record, ImportError> {
        let c = &self.client;
        let mut want: BTreeMap<String, String> = BTreeMap::new();
        want.insert(LABEL_SOURCE.into(), self.source_id.clone());
        if pin {
            want.insert(LABEL_PINNED.into(), PINNED.into());
        }
        let Some(existing) = existing else {
            let image = Image {
                name: name.to_string(),
                labels: want.clone().into_iter().collect(),
                target: Some(target.clone()),
                ..Default::default()
            };
            match c.image_create(ns, image).await {
                Ok(()) => return Ok(Record::Created),
                Err(s) if s.code() == tonic::Code::AlreadyExists => {
                    // Created meanwhile (by CRI or another loader): update it.
                    let again = c.image_get(ns, name).await.map_err(grpc("image get", name))?;
                    return Box::pin(self.put_record(ns, name, pin, target, again)).await;
                }
                Err(s) => return Err(grpc("image create", name)(s)),
            }
        };
        // The whole record goes back, changed, with a mask naming the changes.
        let mut image = existing.clone();
        let mut paths = Vec::new();
        if existing.target.as_ref() != Some(target) {
            image.target = Some(target.clone());
            paths.push("target".to_string());
        }
        for (k, v) in want {
            if existing.labels.get(&k) != Some(&v) {
                paths.push(format!("labels.{k}"));
                image.labels.insert(k, v);
            }
        }
        // No longer to be pinned: take the pin off only if this loader set it.
        let ours = existing.labels.get(LABEL_SOURCE) == Some(&self.source_id);
        if !pin && ours && existing.labels.contains_key(LABEL_PINNED) {
            image.labels.remove(LABEL_PINNED);
            paths.push(format!("labels.{LABEL_PINNED}"));
        }
        if paths.is_empty() {
            return Ok(Record::Unchanged);
        }
        c.image_update(ns, image, paths).await.map_err(grpc("image update", name))?;
        Ok(Record::Updated)
    }
}

enum Record {
    Unchanged,
    Created,
    Updated,
}

#[derive(Default)]
struct Stats {
    blobs: usize,
    bytes: u64,
    adopted: usize,
    adopted_bytes: u64,
    unpacked: bool,
}

impl Stats {
    fn add(&mut self, wrote: Wrote, bytes: u64) {
        match wrote {
            Wrote::Streamed => (self.blobs, self.bytes) = (self.blobs + 1, self.bytes + bytes),
            Wrote::Adopted => (self.adopted, self.adopted_bytes) = (self.adopted + 1, self.adopted_bytes + bytes),
            Wrote::Present | Wrote::NotPlaced => {}
        }
    }
}

#[allow(dead_code)]
fn _assert_send(c: Arc<Context>, img: SourceImage) {
    fn is_send<T: Send>(_: T) {}
    is_send(async move { c.import_tarball(img).await });
}
