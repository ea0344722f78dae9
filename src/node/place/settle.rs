//! `preseed settle`: makes containerd's overlaid content independent of the
//! partition under it, so that the partition can be replaced without
//! `place --overlay --previous` (a partition rewritten in place, an A/B
//! scheme that reuses the old slot before the next boot).
//!
//! It runs while containerd runs, typically from the update agent before it
//! writes the next partition: every blob that lives only in the lower layer
//! (not deleted by containerd, not already in the upper layer), and that the
//! next partition (`--next`) does not ship, is copied into the store,
//! verified, through the overlay's merged view; overlayfs puts the copy in
//! the upper layer. At the next `place --overlay`, blobs in the upper layer
//! are no longer "only the previous partition had them", and none is lost.
//!
//! Why through the merged view: overlayfs does not allow its layers to
//! change under a mount, but a file renamed into the mount is an ordinary
//! write. containerd reading the blob meanwhile keeps its open file (the
//! lower one), whose bytes are the same.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::overlay::{self, copy_blobs, Copied, Layout};
use super::{config, io_err, Damaged, PlaceError, TempDir, CONTENT_DIR, SETTLE_TEMP_DIR};
use crate::human::human_bytes;
use crate::node::read::open::{self, Source};
use crate::node::sys::{Linux, Sys};
use crate::partition::index::CONTENT_DIR as PARTITION_CONTENT;

/// Held (flock) while settling: one settle at a time per root.
const LOCK_FILE: &str = "settle.lock";

/// What to settle, and where.
#[derive(Clone, Debug)]
pub struct SettleOptions {
    /// containerd's root; `None` reads it from `config`.
    pub root: Option<PathBuf>,
    /// containerd's configuration file.
    pub config: PathBuf,
    /// The partition that will replace the current one: blobs it ships
    /// are left where they are.
    pub next: Option<Source>,
}

/// What a settle did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SettleReport {
    /// containerd's root.
    pub root: String,
    /// The partition under the store now (as `place --overlay` named it).
    pub lower: String,
    /// The partition given with `--next`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub next: String,
    /// Blobs copied into the upper layer.
    pub settled: usize,
    /// Their bytes.
    pub bytes_settled: u64,
    /// Lower blobs the upper layer has already (settled before, or
    /// containerd's own copy).
    pub already: usize,
    /// Lower blobs the next partition ships: left in place.
    pub in_next: usize,
    /// Lower blobs containerd deleted (or found damaged at mount): nothing
    /// uses them.
    pub deleted: usize,
    /// Lower blobs whose bytes are wrong: not copied, lost at the swap.
    pub damaged: Vec<Damaged>,
    /// Things worth knowing.
    pub warnings: Vec<String>,
    /// Wall time, in milliseconds.
    pub duration_ms: u64,
}

impl SettleReport {
    /// Non-zero exit: some blob could not be settled, so replacing the
    /// partition without `--previous` would lose it.
    pub fn failed(&self) -> bool {
        !self.damaged.is_empty()
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
        for d in &self.damaged {
            writeln!(
                out,
                "damaged   {} in {}: found {}; not settled, and lost if the partition is replaced without \
                 --previous",
                d.digest,
                d.tarballs.join(", "),
                d.found
            )?;
        }
        if self.lower.is_empty() {
            return writeln!(out, "preseed settle: nothing to settle on {}", self.root);
        }
        let next =
            if self.next.is_empty() { String::new() } else { format!(", {} shipped by {}", self.in_next, self.next) };
        writeln!(
            out,
            "preseed settle: {} blobs ({}) copied from {} into {}; {} there already{next}, {} deleted, {} damaged in \
             {:.2}s",
            self.settled,
            human_bytes(self.bytes_settled),
            self.lower,
            self.root,
            self.already,
            self.deleted,
            self.damaged.len(),
            self.duration_ms as f64 / 1000.0
        )
    }
}

/// Copies the blobs only the overlaid partition has (and `opts.next` lacks)
/// into the overlay's upper layer.
pub fn settle(opts: &SettleOptions) -> Result<SettleReport, PlaceError> {
    settle_with(opts, Arc::new(Linux))
}

/// [`settle`] with the given syscalls.
pub fn settle_with(opts: &SettleOptions, sys: Arc<dyn Sys>) -> Result<SettleReport, PlaceError> {
    let start = Instant::now();
    let root = match (&opts.root, config::read(&opts.config)) {
        (Some(root), _) => root.clone(),
        (None, Ok(c)) => c.root,
        (None, Err(e)) => return Err(PlaceError::UnknownRoot { why: e.to_string() }),
    };
    let mut report = SettleReport { root: root.display().to_string(), ..SettleReport::default() };
    let l = Layout::new(&root);
    if !overlay::is_overlaid(&root) {
        report.warnings.push(format!(
            "containerd's content on {} is not in preseed's overlay: it does not depend on a partition, nothing \
             to settle",
            root.display()
        ));
        return Ok(report);
    }
    if !overlay::is_mounted(&root) {
        return Err(PlaceError::NotMounted { root });
    }
    let _lock = lock(&l.state.join(LOCK_FILE), &root, &*sys)?;
    let state = overlay::read_state(&l.state.join(overlay::STATE_FILE))?
        .ok_or_else(|| io_err(&l.state)(std::io::Error::other(format!("no {} in it", overlay::STATE_FILE))))?;
    report.lower = state.source.clone();

    let next = match &opts.next {
        Some(source) => {
            overlay::wait_for_device(source);
            let opened = open::open_with(source, sys.clone())?;
            report.next = opened.id().to_string();
            let dir = opened.root().join(PARTITION_CONTENT).join("blobs/sha256");
            if !dir.is_dir() {
                return Err(PlaceError::NoContentDir { source_name: report.next.clone() });
            }
            overlay::list_blobs(&dir)?
        }
        None => Default::default(),
    };

    let upper = l.upper.join("blobs/sha256");
    let mut todo = Vec::new();
    for hex in &state.blobs {
        if next.contains_key(hex) {
            report.in_next += 1;
            continue;
        }
        match std::fs::symlink_metadata(upper.join(hex)) {
            Ok(m) if m.is_file() => report.already += 1,
            Ok(_) => report.deleted += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => todo.push(hex),
            Err(e) => return Err(io_err(&upper.join(hex))(e)),
        }
    }

    if !todo.is_empty() {
        let store = root.join(CONTENT_DIR);
        let temp = TempDir::create(store.join(SETTLE_TEMP_DIR))?;
        let from = l.lower.join(PARTITION_CONTENT).join("blobs/sha256");
        let copied = copy_blobs(&todo, &from, &temp.0, &store.join("blobs/sha256"), &*sys)?;
        for (hex, c) in todo.iter().zip(copied) {
            match c {
                Copied::Done(size) => {
                    report.settled += 1;
                    report.bytes_settled += size;
                }
                Copied::Missing => report
                    .warnings
                    .push(format!("sha256:{hex}: named in {} but not on the partition", overlay::STATE_FILE)),
                Copied::Damaged(found) => report.damaged.push(Damaged {
                    digest: format!("sha256:{hex}"),
                    found,
                    tarballs: vec![format!("{PARTITION_CONTENT}/blobs/sha256/{hex}")],
                }),
            }
        }
    }
    report.duration_ms = start.elapsed().as_millis().min(u64::MAX as u128) as u64;
    Ok(report)
}

/// One settle at a time on a root (they would share the temp directory).
fn lock(path: &Path, root: &Path, sys: &dyn Sys) -> Result<File, PlaceError> {
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(io_err(path))?;
    if !sys.try_lock(&file).map_err(io_err(path))? {
        return Err(PlaceError::Settling { root: root.to_path_buf(), lock: path.to_path_buf() });
    }
    Ok(file)
}
