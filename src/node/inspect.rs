//! `preseed inspect`: what a partition holds, from its `preseed.json`.

use std::fmt::Write as _;
use std::path::Path;

use crate::node::read::open::{OpenOptions, Source};
use crate::node::read::source::{self, Refused, SourceError};
use crate::node::read::{mount, open};
use crate::partition::index::{PartitionIndex, INDEX_FILE};
use crate::partition::verity::RootHash;

/// Errors reading a partition's index.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The index could not be read (the same refusal as `load`'s).
    #[error(transparent)]
    Index(#[from] SourceError),
    /// The partition image could not be mounted.
    #[error(transparent)]
    Mount(#[from] mount::MountError),
    /// The partition could not be opened (through dm-verity).
    #[error(transparent)]
    Open(#[from] open::OpenError),
    /// The index read as EIO through dm-verity.
    #[error("{path}: {}", crate::node::read::verity::CORRUPT)]
    Corrupt {
        /// The index file.
        path: String,
    },
}

/// A partition's index, and the entries `load` would refuse.
#[derive(Debug)]
pub struct Inspected {
    /// `preseed.json`.
    pub index: PartitionIndex,
    /// Its entries that no command reads (why, as `load` says it).
    pub refused: Vec<Refused>,
}

/// Reads the index of a partition: an image file or block device (mounted
/// read-only for the moment, which needs root), a directory, or a
/// `preseed.json` itself.
pub fn read_index(path: &Path) -> Result<Inspected, InspectError> {
    if path.is_dir() {
        return read_json(&path.join(INDEX_FILE));
    }
    if mount::sniff(path).is_ok() {
        let loop_file = std::fs::metadata(path).map(|m| m.is_file()).unwrap_or(true);
        let mounted = mount::mount(path, loop_file, std::sync::Arc::new(crate::node::sys::Linux))?;
        return read_json(&mounted.path().join(INDEX_FILE));
    }
    read_json(path)
}

/// [`read_index`] of a partition (image file or block device) opened
/// through dm-verity, checked against `root`.
pub fn read_index_verified(path: &Path, root: &RootHash) -> Result<Inspected, InspectError> {
    let source = Source::detect(path);
    let opts = OpenOptions { verity_root_hash: Some(*root), mount_at: None };
    let opened = open::open_with_options(&source, &opts, std::sync::Arc::new(crate::node::sys::Linux))?;
    let file = opened.root().join(INDEX_FILE);
    read_json(&file).map_err(|e| match e {
        InspectError::Index(SourceError::Io { source, .. }) if source.raw_os_error() == Some(libc::EIO) => {
            InspectError::Corrupt { path: file.display().to_string() }
        }
        e => e,
    })
}

/// Reads `preseed.json` as `load` does, and which entries it would refuse.
fn read_json(file: &Path) -> Result<Inspected, InspectError> {
    let index = source::read_index(file)?;
    let root = file.parent().unwrap_or(Path::new("."));
    let refused = index.images.iter().filter_map(|img| source::refusal(root, file, img)).collect();
    Ok(Inspected { index, refused })
}

/// A table for humans.
pub fn render(index: &PartitionIndex) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{} ({}), {} images", index.build.tool, index.build.format, index.images.len());
    for i in &index.images {
        let mut flags = Vec::new();
        if i.pin {
            flags.push("pinned");
        }
        if i.sandbox {
            flags.push("sandbox");
        }
        if i.boot {
            flags.push("boot");
        }
        let _ = writeln!(
            out,
            "  {:<32} {:<48} {:>10} {} [{}]",
            i.path,
            i.name,
            crate::human::human_bytes(i.size),
            i.platforms.join(","),
            flags.join(",")
        );
        for n in &i.names {
            let _ = writeln!(out, "  {:<32} also {n}", "");
        }
        if let Some(s) = &i.signed_by {
            let _ = writeln!(out, "  {:<32} signed by {} ({}, {})", "", s.key, s.key_sha256, s.format);
        }
        let carried = i.carried();
        if !carried.is_empty() {
            let _ = writeln!(out, "  {:<32} carries {}", "", carried.describe());
        }
    }
    out
}
