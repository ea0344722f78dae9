//! `preseed place`: before containerd starts, copy every blob of the
//! partition that containerd's local content store lacks straight into it
//! (`<root>/io.containerd.content.v1.content/blobs/sha256/<hex>`), so that
//! `preseed load` afterwards only registers them: with containerd's default
//! `shared` content policy, a content write whose digest is already in the
//! local store is committed without its bytes (see
//! [`crate::node::load::containerd::Client::write_blob`]).
//!
//! Rules:
//! * Every placed byte is hashed on the way (on all cores): a blob whose
//!   bytes do not match its name is never placed, and is reported.
//! * A blob appears under its name only complete and on disk: written to a
//!   temp directory inside the content store, flushed with one `syncfs`,
//!   renamed into place, and the directory fsynced.
//! * Never while containerd runs on that root: containerd holds an
//!   exclusive `flock` on its metadata database (`meta.db`, bbolt) for as
//!   long as it runs; place takes the same lock without waiting, and holds
//!   it while placing (a containerd starting meanwhile waits for it).
//! * Placed blobs belong to nobody until a load registers them; a containerd
//!   garbage collection that removes content also removes placed blobs no
//!   image references, so nothing leaks.
//! * Where a placed blob would not be used (a content store that is not the
//!   local directory, the `isolated` sharing policy, an unreadable config),
//!   nothing is placed and the report says why; load then streams.

pub mod config;
pub mod overlay;
pub mod settle;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::digest::{Digest, Hasher};
use crate::human::human_bytes;
use crate::node::policy::Policy;
use crate::node::read::archive::{Archive, Entry};
use crate::node::read::open::{self, OpenOptions, Source};
use crate::node::read::source;
use crate::node::sys::{Linux, Sys};
use crate::partition::verity::RootHash;

/// containerd's local content store, under its root.
pub const CONTENT_DIR: &str = "io.containerd.content.v1.content";
/// containerd's metadata database, under its root; containerd holds an
/// exclusive flock on it while it runs.
pub const META_DB: &str = "io.containerd.metadata.v1.bolt/meta.db";
/// Where blobs are written before they are renamed into place (inside the
/// content store, so the rename stays on one filesystem; containerd only
/// looks at `blobs/` and `ingest/`).
pub(super) const TEMP_DIR: &str = "preseed-place.tmp";
/// Where settle writes before renaming into the store (inside the merged
/// content directory: one filesystem; containerd only looks at `blobs/`
/// and `ingest/`).
pub(super) const SETTLE_TEMP_DIR: &str = "preseed-settle.tmp";
/// Read and hash in pieces of this size: memory stays bounded per core.
const PIECE: usize = 1 << 20;

/// What to place, and where.
#[derive(Clone, Debug)]
pub struct PlaceOptions {
    /// The partition.
    pub source: Source,
    /// containerd's root; `None` reads it from `config`.
    pub root: Option<PathBuf>,
    /// containerd's configuration file.
    pub config: PathBuf,
    /// Read the partition through dm-verity, checked against this root
    /// hash; its blocks are then verified by the kernel and not hashed again.
    pub verity_root_hash: Option<RootHash>,
    /// Images that must be signed, and by whom: the blobs of those that are
    /// not are not copied, and they are reported (with `--overlay`, which
    /// copies nothing, only reported: `load` makes no image of them).
    pub policy: Option<Arc<Policy>>,
}

impl PlaceOptions {
    /// Defaults: root from `/etc/containerd/config.toml`.
    pub fn new(source: Source) -> Self {
        PlaceOptions {
            source,
            root: None,
            config: PathBuf::from(config::DEFAULT_CONFIG),
            verity_root_hash: None,
            policy: None,
        }
    }
}

/// Why placing stopped (damaged blobs are in the report, not here).
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// The partition could not be opened.
    #[error(transparent)]
    Open(#[from] open::OpenError),
    /// The partition's contents could not be listed.
    #[error(transparent)]
    Source(#[from] source::SourceError),
    /// containerd is running on the root.
    #[error(
        "containerd is running on {root} (it holds the lock on {db}): preseed place runs before containerd \
         starts (ExecStartPre= of containerd.service); nothing placed, preseed load will stream the images"
    )]
    Running {
        /// containerd's root.
        root: PathBuf,
        /// The locked database.
        db: PathBuf,
    },
    /// The content directory is a mount preseed did not make.
    #[error("{path} is already a mount point ({fstype}), not preseed's overlay: unmount it first")]
    ForeignMount {
        /// The content directory.
        path: PathBuf,
        /// What is mounted there.
        fstype: String,
    },
    /// overlayfs cannot take a path with `,`, `:` or `\` in its options.
    #[error("{path}: overlayfs mount options cannot name a path with ',', ':' or '\\'; use another containerd root")]
    BadOverlayPath {
        /// The path.
        path: PathBuf,
    },
    /// The root's content is overlaid, but the new partition cannot be.
    #[error(
        "{source_name} has no {dir}/ (a squashfs partition, or bundled by an older preseed), but containerd's content \
         lives in preseed's overlay: bundle the partition as erofs with this preseed"
    , dir = crate::partition::index::CONTENT_DIR)]
    NoContentDir {
        /// The partition.
        source_name: String,
    },
    /// mount(2) of the overlay failed.
    #[error("mounting overlayfs on {path} ({options}) failed: {source}")]
    Overlay {
        /// The content directory.
        path: PathBuf,
        /// The mount options.
        options: String,
        /// The error.
        source: std::io::Error,
    },
    /// A copying place on a root whose content lives in the overlay.
    #[error(
        "containerd's content on {root} lives in preseed's overlay ({root}/{dir}/upper), which is not mounted: run \
         preseed place --overlay, not a copying place",
        dir = overlay::STATE_DIR
    )]
    Overlaid {
        /// containerd's root.
        root: PathBuf,
    },
    /// Neither `--root` nor a readable containerd config.
    #[error("containerd's root is unknown ({why}); give it with --root")]
    UnknownRoot {
        /// Why the config did not tell.
        why: String,
    },
    /// `settle` on a root whose overlay is not mounted.
    #[error(
        "containerd's content on {root} lives in preseed's overlay ({root}/{dir}/upper), which is not mounted: \
         settle runs on a node booted with preseed place --overlay",
        dir = overlay::STATE_DIR
    )]
    NotMounted {
        /// containerd's root.
        root: PathBuf,
    },
    /// Another `preseed settle` runs on the root.
    #[error("another preseed settle is running on {root} (it holds {lock}): let it finish")]
    Settling {
        /// containerd's root.
        root: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PlaceError + '_ {
    move |source| PlaceError::Io { path: path.to_path_buf(), source }
}

/// A blob in the partition whose bytes do not match its name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Damaged {
    /// Its name.
    pub digest: String,
    /// What was found instead: the digest its bytes hash to, or the read error.
    pub found: String,
    /// The tarballs holding it (relative to the source root).
    pub tarballs: Vec<String>,
}

/// What a place did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PlaceReport {
    /// The source.
    pub source: String,
    /// containerd's root.
    pub root: String,
    /// Why nothing was placed, when placing would not help.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_placed: Option<String>,
    /// Blobs copied into the store.
    pub placed: usize,
    /// Their bytes.
    pub bytes_placed: u64,
    /// Blobs the store had already.
    pub present: usize,
    /// Blobs not placed because their bytes are wrong (with `--overlay`:
    /// hidden from containerd).
    pub damaged: Vec<Damaged>,
    /// Tarballs not placed at all, and why: entries `preseed.json` shows to
    /// be unusable, tarballs that cannot be read (as `load` refuses them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreadable: Vec<String>,
    /// `--overlay`: the partition was mounted under the store, not copied.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub overlay: bool,
    /// `--overlay`: where the partition is mounted.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub lower: String,
    /// `--overlay`: blobs the store now has from the partition, uncopied.
    pub overlaid: usize,
    /// `--overlay`: their bytes.
    pub bytes_overlaid: u64,
    /// `--overlay`: blobs only the previous partition had, copied from it.
    pub kept_from_previous: usize,
    /// Their bytes.
    pub bytes_kept_from_previous: u64,
    /// `--overlay`: blobs only the previous partition had that could not be
    /// kept (no `--previous`, or it lacks them): images using them must be
    /// pulled again.
    pub lost: Vec<String>,
    /// Things worth knowing.
    pub warnings: Vec<String>,
    /// Wall time, in milliseconds.
    pub duration_ms: u64,
}

impl PlaceReport {
    /// Whether the command should exit non-zero: the partition is damaged.
    /// Not with `--overlay`: the overlay is mounted all the same and
    /// containerd must start (the damaged image then fails its load), so
    /// damaged and lost blobs are reported but the exit status is 0.
    pub fn failed(&self) -> bool {
        let damage = !self.damaged.is_empty() || !self.unreadable.is_empty();
        !self.overlay && damage
    }

    /// Machine-readable report.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }

    /// Warnings, damaged blobs, then a summary line.
    pub fn print_human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        for w in &self.warnings {
            writeln!(out, "warning: {w}")?;
        }
        for u in &self.unreadable {
            writeln!(out, "unreadable {u}; not placed (preseed load fails it the same way)")?;
        }
        for d in &self.damaged {
            let what = if self.overlay { "hidden from containerd" } else { "not placed" };
            writeln!(
                out,
                "damaged   {} in {}: found {}; {what} (the partition is corrupt: rebuild or re-write it)",
                d.digest,
                d.tarballs.join(", "),
                d.found
            )?;
        }
        for l in &self.lost {
            writeln!(
                out,
                "lost      {l}: only the previous partition had it and it could not be kept (give that partition \
                 with --previous); images that use it must be pulled again"
            )?;
        }
        let secs = self.duration_ms as f64 / 1000.0;
        match &self.not_placed {
            Some(why) => writeln!(out, "preseed place: nothing placed: {why}; preseed load will stream the images"),
            None if self.overlay => writeln!(
                out,
                "preseed place: {} blobs ({}) of {} overlaid on {} (mounted on {}), none copied; {} kept from the \
                 previous partition ({}), {} lost, {} damaged in {secs:.2}s",
                self.overlaid,
                human_bytes(self.bytes_overlaid),
                self.source,
                self.root,
                self.lower,
                self.kept_from_previous,
                human_bytes(self.bytes_kept_from_previous),
                self.lost.len(),
                self.damaged.len()
            ),
            None => writeln!(
                out,
                "preseed place: {} blobs placed ({}), {} already in {}, {} damaged in {secs:.2}s",
                self.placed,
                human_bytes(self.bytes_placed),
                self.present,
                self.root,
                self.damaged.len()
            ),
        }
    }
}

/// One blob to place: where its bytes are, and who holds it.
struct Candidate {
    digest: Digest,
    archive: usize,
    entry: Entry,
    tarballs: Vec<String>,
}

/// Places the blobs of `opts.source` into containerd's content store.
pub fn place(opts: &PlaceOptions) -> Result<PlaceReport, PlaceError> {
    place_with(opts, Arc::new(Linux))
}

/// [`place`] with the given syscalls.
pub fn place_with(opts: &PlaceOptions, sys: Arc<dyn Sys>) -> Result<PlaceReport, PlaceError> {
    let start = Instant::now();
    let mut report = PlaceReport::default();
    let Some(root) = root(opts, &mut report) else { return Ok(report) };
    let _lock = lock(&root, &*sys)?;
    if overlay::is_overlaid(&root) && !overlay::is_mounted(&root) {
        return Err(PlaceError::Overlaid { root });
    }
    copy_all(opts, &root, report, start, &sys)
}

/// The copying place itself, with containerd's lock held.
fn copy_all(
    opts: &PlaceOptions,
    root: &Path,
    mut report: PlaceReport,
    start: Instant,
    sys: &Arc<dyn Sys>,
) -> Result<PlaceReport, PlaceError> {
    let open_opts = OpenOptions { verity_root_hash: opts.verity_root_hash, mount_at: None };
    let opened = open::open_with_options(&opts.source, &open_opts, sys.clone())?;
    // Through dm-verity every block read is checked against the root hash.
    let verified = opened.verity().is_some();
    report.source = opened.id().to_string();
    let mut listing = source::list(opened.root())?;
    if let Some(policy) = &opts.policy {
        policy.screen(&mut listing);
    }
    report.warnings.extend(listing.warnings.iter().cloned());
    report.unreadable.extend(listing.refused.iter().map(|r| r.to_string()));

    // Every blob of every tarball, once.
    let mut archives = Vec::new();
    let mut blobs: BTreeMap<Digest, Candidate> = BTreeMap::new();
    for img in &listing.images {
        let archive = match Archive::open(&img.path) {
            Ok(a) => a,
            Err(e) => {
                report.unreadable.push(format!("{}: {e}", img.rel));
                continue;
            }
        };
        for (name, entry) in archive.entries() {
            let Some(digest) = name.strip_prefix("blobs/sha256/").and_then(|h| format!("sha256:{h}").parse().ok())
            else {
                continue;
            };
            let c = blobs.entry(digest).or_insert_with_key(|d| Candidate {
                digest: d.clone(),
                archive: archives.len(),
                entry,
                tarballs: Vec::new(),
            });
            c.tarballs.push(img.rel.clone());
        }
        archives.push(archive);
    }

    let store = root.join(CONTENT_DIR);
    let target_dir = store.join("blobs/sha256");
    make_dirs(root, &target_dir)?;
    let mut todo = Vec::new();
    for c in blobs.into_values() {
        match std::fs::symlink_metadata(target_dir.join(c.digest.hex())) {
            Ok(m) if m.len() == c.entry.size => report.present += 1,
            Ok(m) => report.warnings.push(format!(
                "{} is in the store with {} bytes, not {}: left as it is (containerd will refuse it)",
                c.digest,
                m.len(),
                c.entry.size
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => todo.push(c),
            Err(e) => return Err(io_err(&target_dir.join(c.digest.hex()))(e)),
        }
    }

    let temp = TempDir::create(store.join(TEMP_DIR))?;
    let copied = crate::parallel::map(
        &todo,
        |c| c.entry.size,
        |c| copy(archives[c.archive].file(), c, &temp.0, !verified, &**sys),
    );
    let mut good = Vec::new();
    for (c, result) in todo.iter().zip(copied) {
        match result? {
            None => good.push(c),
            Some(found) => {
                report.damaged.push(Damaged { digest: c.digest.to_string(), found, tarballs: c.tarballs.clone() })
            }
        }
    }
    publish(&temp.0, good.iter().map(|c| c.digest.hex()), &target_dir, &**sys)?;
    report.placed += good.len();
    report.bytes_placed += good.iter().map(|c| c.entry.size).sum::<u64>();
    drop(temp);
    drop(opened);
    report.duration_ms = start.elapsed().as_millis().min(u64::MAX as u128) as u64;
    Ok(report)
}

/// containerd's root, from the options or its config; `None` (with the
/// reason in the report) where placed blobs would not be used.
fn root(opts: &PlaceOptions, report: &mut PlaceReport) -> Option<PathBuf> {
    let content = match config::read(&opts.config) {
        Ok(c) => Some(c),
        Err(e) if opts.root.is_some() => {
            report.warnings.push(format!("{e} (using --root; content sharing policy unknown)"));
            None
        }
        Err(e) => {
            report.not_placed = Some(format!("containerd's root is unknown ({e}); give it with --root"));
            return None;
        }
    };
    let root = opts.root.clone().or_else(|| content.as_ref().map(|c| c.root.clone())).expect("one of them is set");
    report.root = root.display().to_string();
    if let Some(why) = content.and_then(|c| c.unusable) {
        report.not_placed = Some(why);
        return None;
    }
    Some(root)
}

/// How long a held lock may take to go before place says containerd runs.
const LOCK_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Takes containerd's own lock on its metadata database. No database yet:
/// no containerd has run on this root.
///
/// containerd holds the lock for as long as it runs. A holder that lets go
/// within [`LOCK_GRACE`] is not containerd: a flock belongs to the open
/// file, so a process forked while an earlier place held it keeps it until
/// that process execs (seen with tests that start processes in parallel).
fn lock(root: &Path, sys: &dyn Sys) -> Result<Option<File>, PlaceError> {
    let db = root.join(META_DB);
    let file = match File::open(&db) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&db)(e)),
    };
    let start = Instant::now();
    while !sys.try_lock(&file).map_err(io_err(&db))? {
        if start.elapsed() >= LOCK_GRACE {
            return Err(PlaceError::Running { root: root.to_path_buf(), db });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(Some(file))
}

/// Gives files written in `temp` their names in `to` (same filesystem): one
/// `syncfs` first, so no name ever points at bytes still in memory, then
/// the renames, then `to` fsynced so the names survive a crash.
pub(super) fn publish<'a>(
    temp: &Path,
    names: impl IntoIterator<Item = &'a str>,
    to: &Path,
    sys: &dyn Sys,
) -> Result<(), PlaceError> {
    let dir = File::open(temp).map_err(io_err(temp))?;
    sys.sync_fs(&dir).map_err(io_err(temp))?;
    for name in names {
        let target = to.join(name);
        std::fs::rename(temp.join(name), &target).map_err(io_err(&target))?;
    }
    File::open(to).and_then(|d| d.sync_all()).map_err(io_err(to))
}

/// Creates the store's directories as containerd would (root 0711, the
/// rest 0755).
fn make_dirs(root: &Path, blobs: &Path) -> Result<(), PlaceError> {
    if !root.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o711).create(root).map_err(io_err(root))?;
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o755).create(blobs).map_err(io_err(blobs))
}

/// Copies one blob into `dir` under its hex name, hashing it on the way
/// unless `hash` is false (dm-verity checked the bytes).
/// `Some(what was found)` if the bytes do not match or the partition
/// refuses them (EIO: dm-verity found a bad block); nothing is left then.
fn copy(file: &Arc<File>, c: &Candidate, dir: &Path, hash: bool, sys: &dyn Sys) -> Result<Option<String>, PlaceError> {
    let to = dir.join(c.digest.hex());
    let mut out =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o444).open(&to).map_err(io_err(&to))?;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; PIECE.min(c.entry.size as usize)];
    let mut at = 0u64;
    while at < c.entry.size {
        let n = PIECE.min((c.entry.size - at) as usize);
        if let Err(e) = file.read_exact_at(&mut buf[..n], c.entry.offset + at) {
            if e.raw_os_error() != Some(libc::EIO) {
                return Err(io_err(&to)(e));
            }
            drop(out);
            std::fs::remove_file(&to).map_err(io_err(&to))?;
            return Ok(Some(format!(
                "an I/O error at byte {at} ({e}; through dm-verity: a block that does not match the root hash)"
            )));
        }
        if hash {
            hasher.update(&buf[..n]);
        }
        out.write_all(&buf[..n]).map_err(io_err(&to))?;
        // Start writeback now rather than all at once in the final syncfs:
        // the disk then works while the next pieces are read and hashed.
        sys.start_writeback(&out, at, n as u64);
        at += n as u64;
    }
    let found = hasher.finish();
    if hash && found != c.digest {
        drop(out);
        std::fs::remove_file(&to).map_err(io_err(&to))?;
        return Ok(Some(format!("bytes that hash to {found}")));
    }
    Ok(None)
}

/// The temp directory, emptied and removed when dropped (also on failure).
struct TempDir(PathBuf);

impl TempDir {
    fn create(path: PathBuf) -> Result<TempDir, PlaceError> {
        // Left by a run that was killed: nothing in it was ever named.
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
        }
        std::fs::DirBuilder::new().mode(0o700).create(&path).map_err(io_err(&path))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
