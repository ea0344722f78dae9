//! squashfs partition images through backhand. (Being implemented.)

use std::path::Path;

use super::tree::Tree;

/// Statistics of a written image.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Bytes of the image file.
    pub image_bytes: u64,
}

/// Errors of the squashfs writer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not implemented yet.
    #[error("the squashfs writer is not implemented yet")]
    NotYet,
}

/// Writes `tree` as a squashfs image at `out`.
pub fn write(_tree: &Tree, _out: &Path) -> Result<Stats, Error> {
    Err(Error::NotYet)
}
