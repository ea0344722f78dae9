//! The partition format both wings agree on: the tree of a partition
//! (`preseed.json`, `<namespace>/<file>.tar`, `.content/`), its index
//! ([`index`]), the dm-verity tree's on-disk format and root hash
//! ([`verity`]), and which filesystem an image holds ([`Format`]). The build
//! wing writes it (`build::write`), the node wing reads it (`node::read`).
//! [`release`] is a published release's plan: where each blob sits in the
//! image, so `preseed pull` can rebuild it from blobs. Nothing here does I/O
//! beyond parsing what it is given, except [`hashtree`], the one writer both
//! sides need: bundle appends the verity tree, pull rebuilds it.

pub mod hashtree;
pub mod index;
pub mod release;
pub mod verity;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Filesystem format of a partition image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// erofs, uncompressed, chunk-deduplicated (default).
    #[default]
    Erofs,
    /// squashfs.
    Squashfs,
}

impl Format {
    /// File extension and name used for the image: `preseed.<ext>`.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Erofs => "erofs",
            Format::Squashfs => "squashfs",
        }
    }

    /// Recognises a partition image by its superblock magic.
    pub fn sniff(header: &[u8]) -> Option<Format> {
        // squashfs: "hsqs" at 0; erofs: 0xE0F5E1E2 (LE) at 1024.
        if header.len() >= 4 && &header[..4] == b"hsqs" {
            return Some(Format::Squashfs);
        }
        if header.len() >= 1028 && header[1024..1028] == 0xE0F5_E1E2u32.to_le_bytes() {
            return Some(Format::Erofs);
        }
        None
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.extension())
    }
}

/// A format name that is neither `erofs` nor `squashfs`.
#[derive(Debug, thiserror::Error)]
#[error("unknown partition format {0:?}: expected \"erofs\" or \"squashfs\"")]
pub struct UnknownFormat(pub String);

impl FromStr for Format {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "erofs" => Ok(Format::Erofs),
            "squashfs" => Ok(Format::Squashfs),
            _ => Err(UnknownFormat(s.to_string())),
        }
    }
}
