//! `preseed inspect`: what a partition holds, from its `preseed.json`.

use std::fmt::Write as _;
use std::path::Path;

use super::index::{PartitionIndex, INDEX_FILE};

/// Errors reading a partition's index.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// I/O.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Not a preseed index.
    #[error("{path}: not a preseed index: {message}")]
    Invalid {
        /// The path.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Image files need mounting, which is not available here.
    #[error("{path}: reading a partition image needs the loader (mount); inspect its directory or the preseed.json beside it")]
    NeedsMount {
        /// The path.
        path: String,
    },
}

/// Reads the index of a partition directory, or of an index file itself.
pub fn read_index(path: &Path) -> Result<PartitionIndex, InspectError> {
    let file = if path.is_dir() { path.join(INDEX_FILE) } else { path.to_path_buf() };
    let shown = file.display().to_string();
    let bytes = std::fs::read(&file).map_err(|source| InspectError::Io { path: shown.clone(), source })?;
    if super::Format::sniff(&bytes[..bytes.len().min(4096)]).is_some() {
        return Err(InspectError::NeedsMount { path: shown });
    }
    serde_json::from_slice(&bytes).map_err(|e| InspectError::Invalid { path: shown, message: e.to_string() })
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
        let _ = writeln!(
            out,
            "  {:<32} {:<48} {:>10} {} [{}]",
            i.path,
            i.name,
            crate::bundle::human_bytes(i.size),
            i.platforms.join(","),
            flags.join(",")
        );
        for n in &i.names {
            let _ = writeln!(out, "  {:<32} also {n}", "");
        }
    }
    out
}
