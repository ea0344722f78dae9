//! `preseed place --overlay`: zero copy. The partition's `.content`
//! directory (every blob as `blobs/sha256/<hex>`, sharing the tarballs'
//! blocks) becomes the read-only lower layer of an overlayfs mounted on
//! containerd's content directory; containerd's own files live in the upper
//! layer. containerd then finds every blob of the partition in its local
//! store without a byte copied, and `preseed load` registers them as it
//! does placed blobs.
//!
//! Under `<root>/preseed-overlay/`:
//! * `lower/`: the partition, mounted for good (it outlives this process,
//!   as the overlay does);
//! * `upper/`, `work/`: the overlay's writable layer. The first run moves
//!   containerd's existing content directory here (one rename);
//! * `lower.json`: which partition is the lower layer and its blob names.
//!
//! What must hold, and how:
//! * A damaged blob is never served: the lower's blobs are hashed (on all
//!   cores) whenever the partition is new to this root, unless it is read
//!   through dm-verity; a damaged one is hidden by a whiteout in the upper
//!   layer, so load streams it and containerd refuses it.
//! * GC: containerd deleting a lower blob leaves a whiteout in the upper
//!   layer; nothing leaks onto the writable disk.
//! * Partition updates: containerd may still reference blobs that only the
//!   old partition had (images no longer shipped, pulls that shared a
//!   layer). Before the new partition goes under the store, those blobs are
//!   copied into the upper layer from the previous partition (`--previous`,
//!   e.g. the other slot of an A/B pair), verified. Blobs that cannot be
//!   found are reported as lost: images using them must be pulled again.
//! * Again in the same boot (containerd restarted): the overlay is already
//!   there, nothing is done.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::BufReader;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{io_err, lock, Candidate, Damaged, PlaceError, PlaceOptions, PlaceReport, TempDir, CONTENT_DIR, PIECE};
use crate::digest::{Digest, Hasher};
use crate::node::read::archive::Entry;
use crate::node::read::mount;
use crate::node::read::open::{self, OpenOptions, Source};
use crate::node::sys::{Linux, Sys};
use crate::partition::index::{CONTENT_DIR as PARTITION_CONTENT, INDEX_FILE};

/// preseed's overlay state, under containerd's root.
pub const STATE_DIR: &str = "preseed-overlay";
pub(super) const STATE_FILE: &str = "lower.json";

/// Which partition is the lower layer (recorded after each overlay mount).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct LowerState {
    /// The source as named.
    pub(super) source: String,
    /// sha256 of its `preseed.json`: names the partition's contents.
    index: String,
    /// Hex names of its blobs.
    pub(super) blobs: BTreeSet<String>,
}

/// The overlay's paths under containerd's root.
pub(super) struct Layout {
    content: PathBuf,
    pub(super) state: PathBuf,
    pub(super) lower: PathBuf,
    pub(super) upper: PathBuf,
    work: PathBuf,
}

impl Layout {
    pub(super) fn new(root: &Path) -> Layout {
        let state = root.join(STATE_DIR);
        Layout {
            content: root.join(CONTENT_DIR),
            lower: state.join("lower"),
            upper: state.join("upper"),
            work: state.join("work"),
            state,
        }
    }
}

/// Whether containerd's content on `root` lives in preseed's overlay
/// (then a copying place or a bare containerd would not see it).
pub fn is_overlaid(root: &Path) -> bool {
    Layout::new(root).upper.is_dir()
}

/// Whether preseed's overlay is mounted on containerd's content directory.
pub fn is_mounted(root: &Path) -> bool {
    mount::fs_type_at(&Layout::new(root).content).as_deref() == Some("overlay")
}

/// Mounts the partition as the lower layer of containerd's content store;
/// `previous` is the partition that was the lower layer before, if it may
/// have changed.
pub fn overlay(opts: &PlaceOptions, previous: Option<&Source>) -> Result<PlaceReport, PlaceError> {
    overlay_with(opts, previous, Arc::new(Linux))
}

/// [`overlay`] with the given syscalls.
pub fn overlay_with(
    opts: &PlaceOptions,
    previous: Option<&Source>,
    sys: Arc<dyn Sys>,
) -> Result<PlaceReport, PlaceError> {
    let start = Instant::now();
    let mut report = PlaceReport { overlay: true, ..PlaceReport::default() };
    let Some(root) = super::root(opts, &mut report) else { return Ok(report) };
    let _lock = lock(&root, &*sys)?;
    let l = Layout::new(&root);

    match mount::fs_type_at(&l.content) {
        Some(fs) if fs == "overlay" => {
            report.source = opts.source.id();
            report.warnings.push(format!("{} is already overlaid: nothing to do", l.content.display()));
            if let Some(held) = read_state(&l.state.join(STATE_FILE))?.filter(|s| s.source != report.source) {
                report.warnings.push(format!(
                    "the overlay holds {}, not {}: the partition changes at the next boot (or once containerd is \
                     stopped and the overlay and {} are unmounted)",
                    held.source,
                    report.source,
                    l.lower.display()
                ));
            }
            report.duration_ms = elapsed_ms(start);
            return Ok(report);
        }
        Some(fs) => return Err(PlaceError::ForeignMount { path: l.content.clone(), fstype: fs }),
        None => {}
    }
    for p in [&l.content, &l.upper, &l.work, &l.lower] {
        if p.to_str().is_none_or(|s| s.contains([',', ':', '\\'])) {
            return Err(PlaceError::BadOverlayPath { path: p.clone() });
        }
    }
    // A node whose containerd never ran has no root yet (containerd makes it 0711).
    if !root.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o711).create(&root).map_err(io_err(&root))?;
    }
    mkdir(&l.state, 0o700)?;
    mkdir(&l.lower, 0o700)?;
    clear_leftovers(&l)?;
    // Left mounted by a run that stopped before the overlay was mounted.
    if mount::fs_type_at(&l.lower).is_some() {
        sys.unmount(&l.lower).map_err(io_err(&l.lower))?;
    }

    let mount_at = match opts.source {
        Source::Dir(_) => None,
        _ => Some(l.lower.clone()),
    };
    wait_for_device(&opts.source);
    let open_opts = OpenOptions { verity_root_hash: opts.verity_root_hash, mount_at };
    let opened = open::open_with_options(&opts.source, &open_opts, sys.clone())?;
    report.source = opened.id().to_string();
    let lower_content = opened.root().join(PARTITION_CONTENT);
    if !lower_content.join("blobs/sha256").is_dir() {
        drop(opened);
        if !l.upper.exists() {
            // Never overlaid: copying does the same job, only slower.
            let warning = no_content_dir(&report.source);
            let mut copied =
                super::copy_all(opts, &root, PlaceReport { root: report.root, ..Default::default() }, start, &sys)?;
            copied.warnings.insert(0, warning);
            return Ok(copied);
        }
        return Err(PlaceError::NoContentDir { source_name: report.source.clone() });
    }
    let index = Digest::of(&std::fs::read(opened.root().join(INDEX_FILE)).map_err(io_err(opened.root()))?);
    // What load will refuse is reported now, but the overlay copies nothing
    // and so keeps nothing out: load makes no image of a refused entry.
    match crate::node::read::source::list(opened.root()) {
        Ok(mut listing) => {
            if let Some(policy) = &opts.policy {
                policy.screen(&mut listing);
            }
            report.unreadable.extend(listing.refused.iter().map(|r| format!("{r}; load will not import it")));
        }
        Err(e) => report.warnings.push(format!("{e}; load will refuse this partition")),
    }
    let blobs = list_blobs(&lower_content.join("blobs/sha256"))?;
    let new =
        LowerState { source: report.source.clone(), index: index.to_string(), blobs: blobs.keys().cloned().collect() };
    let old = read_state(&l.state.join(STATE_FILE))?;

    // First run: containerd's content so far becomes the upper layer.
    let first = !l.upper.exists();
    if first {
        if l.content.exists() {
            std::fs::rename(&l.content, &l.upper).map_err(io_err(&l.content))?;
        } else {
            mkdir(&l.upper, 0o755)?;
        }
        File::open(&l.state).and_then(|d| d.sync_all()).map_err(io_err(&l.state))?;
    }
    mkdir(&l.work, 0o700)?;
    let upper_blobs = l.upper.join("blobs/sha256");
    std::fs::DirBuilder::new().recursive(true).mode(0o755).create(&upper_blobs).map_err(io_err(&upper_blobs))?;

    // Blobs only the old partition had, that containerd may still use:
    // not in the new one, not in the upper layer, not deleted (a whiteout).
    let changed = old.as_ref().filter(|o| o.index != new.index);
    let missing: Vec<&String> = match changed {
        Some(old) => old
            .blobs
            .iter()
            .filter(|h| !new.blobs.contains(*h))
            .filter(|h| std::fs::symlink_metadata(upper_blobs.join(h)).is_err())
            .collect(),
        None => Vec::new(),
    };
    // The old partition's whiteouts (blobs containerd deleted, or found
    // damaged) would hide the new partition's good copies; damaged ones are
    // hidden again below.
    if changed.is_some() {
        clear_whiteouts(&upper_blobs)?;
    }

    // A partition new to this root is checked once, unless dm-verity
    // checks every read.
    let known = old.as_ref().is_some_and(|o| o.index == new.index);
    if !known && opened.verity().is_none() {
        let todo: Vec<&String> = blobs.keys().collect();
        let dir = lower_content.join("blobs/sha256");
        let checked = crate::parallel::map(&todo, |hex| blobs[*hex], |hex| check(&dir.join(hex), hex));
        for (hex, result) in todo.iter().zip(checked) {
            if let Some(found) = result? {
                let path = upper_blobs.join(hex);
                sys.whiteout(&path).map_err(io_err(&path))?;
                report.damaged.push(Damaged {
                    digest: format!("sha256:{hex}"),
                    found,
                    tarballs: vec![format!("{PARTITION_CONTENT}/blobs/sha256/{hex}")],
                });
            }
        }
    }
    if !missing.is_empty() {
        keep_from_previous(&missing, previous, &l, &mut report, &sys)?;
    }

    let options =
        format!("lowerdir={},upperdir={},workdir={}", lower_content.display(), l.upper.display(), l.work.display());
    if !l.content.exists() {
        mkdir(&l.content, 0o755)?;
    }
    if let Err(source) = sys.mount_overlay(&l.content, &options) {
        if first && std::fs::remove_dir(&l.content).is_ok() {
            // Put containerd's content back where it was, without the
            // whiteouts of damaged blobs (nothing else was added).
            let _ = clear_whiteouts(&upper_blobs);
            let _ = std::fs::rename(&l.upper, &l.content);
        }
        return Err(PlaceError::Overlay { path: l.content.clone(), options, source });
    }
    // The overlay holds the lower mount from here on, whatever follows.
    opened.keep();
    write_state(&l.state, &new)?;
    report.overlaid = blobs.len() - report.damaged.len();
    report.bytes_overlaid = blobs.values().sum();
    report.lower = l.lower.display().to_string();
    report.duration_ms = elapsed_ms(start);
    Ok(report)
}

/// How long a `--device` may take to appear: containerd's unit does not wait
/// for udev to create `/dev/disk/by-partlabel/…`, and with `--overlay`
/// containerd must not start without it.
const DEVICE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits (up to [`DEVICE_WAIT`]) for a device source to exist; opening it
/// then says what is missing.
pub(super) fn wait_for_device(source: &Source) {
    if let Source::Device(path) = source {
        let start = Instant::now();
        while !path.exists() && start.elapsed() < DEVICE_WAIT {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

fn no_content_dir(source: &str) -> String {
    format!(
        "{source} has no {PARTITION_CONTENT}/ (a squashfs partition, or bundled by an older preseed): its blobs were \
         copied instead of overlaid"
    )
}

/// Copies `missing` blobs (hex names) from the previous partition into the
/// upper layer, verified; whatever it lacks is reported as lost.
fn keep_from_previous(
    missing: &[&String],
    previous: Option<&Source>,
    l: &Layout,
    report: &mut PlaceReport,
    sys: &Arc<dyn Sys>,
) -> Result<(), PlaceError> {
    let Some(previous) = previous else {
        report.lost = missing.iter().map(|h| format!("sha256:{h}")).collect();
        return Ok(());
    };
    wait_for_device(previous);
    // Not a reason to keep containerd from starting: the blobs are lost
    // either way, and the report says which.
    let opened = match open::open_with(previous, sys.clone()) {
        Ok(o) => o,
        Err(e) => {
            report.warnings.push(format!("the previous partition cannot be opened: {e}"));
            report.lost = missing.iter().map(|h| format!("sha256:{h}")).collect();
            return Ok(());
        }
    };
    let dir = opened.root().join(PARTITION_CONTENT).join("blobs/sha256");
    let temp = TempDir::create(l.state.join("tmp"))?;
    let copied = copy_blobs(missing, &dir, &temp.0, &l.upper.join("blobs/sha256"), &**sys)?;
    for (hex, result) in missing.iter().zip(copied) {
        match result {
            Copied::Done(size) => {
                report.kept_from_previous += 1;
                report.bytes_kept_from_previous += size;
            }
            Copied::Missing | Copied::Damaged(_) => report.lost.push(format!("sha256:{hex}")),
        }
    }
    Ok(())
}

/// What became of one blob [`copy_blobs`] was asked for.
pub(super) enum Copied {
    /// Copied: its size.
    Done(u64),
    /// Not in the source directory.
    Missing,
    /// Its bytes are wrong (what was found instead): not copied.
    Damaged(String),
}

/// Copies the blobs named `hexes` from the directory `from` into `to`,
/// through `temp` (on `to`'s filesystem) as a copying place does: each
/// hashed on the way, 0444, then published ([`super::publish`]). A blob
/// appears in `to` only whole and good.
pub(super) fn copy_blobs(
    hexes: &[&String],
    from: &Path,
    temp: &Path,
    to: &Path,
    sys: &dyn Sys,
) -> Result<Vec<Copied>, PlaceError> {
    let size = |hex: &&String| std::fs::metadata(from.join(hex)).map_or(0, |m| m.len());
    let copied = crate::parallel::map(hexes, size, |hex| {
        let path = from.join(hex);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Copied::Missing),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let size = file.metadata().map_err(io_err(&path))?.len();
        let digest = format!("sha256:{hex}").parse().expect("blob names are checked when listed");
        let c = Candidate { digest, archive: 0, entry: Entry { offset: 0, size }, tarballs: Vec::new() };
        Ok(match super::copy(&Arc::new(file), &c, temp, true, sys)? {
            None => Copied::Done(size),
            Some(found) => Copied::Damaged(found),
        })
    });
    let copied: Vec<Copied> = copied.into_iter().collect::<Result<_, _>>()?;
    let done = hexes.iter().zip(&copied).filter(|(_, c)| matches!(c, Copied::Done(_))).map(|(hex, _)| hex.as_str());
    super::publish(temp, done, to, sys)?;
    Ok(copied)
}

/// `Some(what was found)` if the blob at `path` does not hash to `hex`.
fn check(path: &Path, hex: &str) -> Result<Option<String>, PlaceError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut hasher = Hasher::new();
    match std::io::copy(&mut BufReader::with_capacity(PIECE, file), &mut hasher) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EIO) => {
            return Ok(Some(format!("an I/O error at byte {} ({e})", hasher.len())));
        }
        Err(e) => return Err(io_err(path)(e)),
    }
    let found = hasher.finish();
    Ok((found.hex() != hex).then(|| format!("bytes that hash to {found}")))
}

/// Removes what a run cut short (a power cut, a kill) left, before the
/// overlay is mounted: the temp directory of `--previous` copies, a state
/// file never renamed into place, and the temp directories `settle` (or a
/// copying place) left in the upper layer. None was ever named as a blob.
fn clear_leftovers(l: &Layout) -> Result<(), PlaceError> {
    let mut stale = vec![l.state.join("tmp")];
    stale.extend([super::TEMP_DIR, super::SETTLE_TEMP_DIR].iter().map(|n| l.upper.join(n)));
    for entry in std::fs::read_dir(&l.state).map_err(io_err(&l.state))? {
        let entry = entry.map_err(io_err(&l.state))?;
        if entry.file_name().to_string_lossy().starts_with(".tmp") {
            stale.push(entry.path());
        }
    }
    for path in stale {
        let removed = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
            Ok(_) => std::fs::remove_file(&path),
            Err(_) => continue,
        };
        removed.map_err(io_err(&path))?;
    }
    Ok(())
}

/// Removes every whiteout (character device 0:0) in `dir`.
fn clear_whiteouts(dir: &Path) -> Result<(), PlaceError> {
    use std::os::unix::fs::FileTypeExt;
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let m = std::fs::symlink_metadata(e.path()).map_err(io_err(&e.path()))?;
        if m.file_type().is_char_device() && m.rdev() == 0 {
            std::fs::remove_file(e.path()).map_err(io_err(&e.path()))?;
        }
    }
    Ok(())
}

/// Every `<hex>` file of the lower's `blobs/sha256`, with its size.
pub(super) fn list_blobs(dir: &Path) -> Result<BTreeMap<String, u64>, PlaceError> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if format!("sha256:{name}").parse::<Digest>().is_ok() {
            out.insert(name, e.metadata().map_err(io_err(&e.path()))?.size());
        }
    }
    Ok(out)
}

pub(super) fn read_state(path: &Path) -> Result<Option<LowerState>, PlaceError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            io_err(path)(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{e}; remove the file only if the lower layer's old blobs need not be kept"),
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Writes the state atomically: temp file, fsync, rename, fsync the directory.
fn write_state(dir: &Path, state: &LowerState) -> Result<(), PlaceError> {
    let path = dir.join(STATE_FILE);
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err(dir))?;
    let bytes = serde_json::to_vec_pretty(state).expect("state serializes");
    std::io::Write::write_all(&mut tmp, &bytes).map_err(io_err(&path))?;
    tmp.as_file().sync_all().map_err(io_err(&path))?;
    tmp.persist(&path).map_err(|e| io_err(&path)(e.error))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

fn mkdir(path: &Path, mode: u32) -> Result<(), PlaceError> {
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn elapsed_ms(start: Instant) -> u64 {
    start.elapsed().as_millis().min(u64::MAX as u128) as u64
}
