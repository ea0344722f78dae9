//! Native erofs writer (see issue 3). Placeholder until it lands.

use std::path::Path;

use super::tree::Tree;

/// Statistics of a written image.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Bytes of the image file.
    pub image_bytes: u64,
}

/// Errors of the erofs writer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not implemented yet.
    #[error("the erofs writer is not implemented yet; use --format squashfs")]
    NotYet,
    /// I/O on the output or a blob.
    #[error("{path}: {source}")]
    Io {
        /// Path concerned.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Writes `tree` as an erofs image at `out`.
pub fn write(_tree: &Tree, _out: &Path) -> Result<Stats, Error> {
    Err(Error::NotYet)
}
