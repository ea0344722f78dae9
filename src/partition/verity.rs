//! The dm-verity hash tree's on-disk format, as both wings see it: a
//! partition image carries the filesystem and, after it, what proves it —
//! `veritysetup` format 1, sha256, 4096-byte data and hash blocks, with a
//! verity superblock.
//!
//! Layout after the (4096-padded) filesystem, at `hash_offset`: the
//! superblock block, then the hash levels, the level nearest the root first
//! (as veritysetup lays them out). Every hash is `sha256(salt ‖ block)`; the
//! root hash ([`RootHash`]) is that of the single top block. The build wing
//! writes the tree (`partition::hashtree`, also used by `node::pull`), the node wing opens it
//! (`node::read::verity`).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Data and hash block size.
pub const BLOCK: u64 = 4096;
/// Bytes of one hash.
pub const HASH: u64 = 32;
/// Hashes per hash block.
pub const PER_BLOCK: u64 = BLOCK / HASH;
/// The kernel command line parameter a root hash can be given in.
pub const CMDLINE_PARAMETER: &str = "preseed.roothash";

/// Where the tree is and how to check it: what `preseed.json` beside the
/// image records and what `veritysetup` needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerityInfo {
    /// Root hash, hex.
    pub root_hash: String,
    /// Byte offset of the superblock (= data bytes, 4096-aligned).
    pub hash_offset: u64,
    /// Data blocks covered.
    pub data_blocks: u64,
    /// Salt, hex.
    pub salt: String,
    /// Always `sha256`.
    pub hash_algorithm: String,
}

/// The superblock's first eight bytes.
pub const MAGIC: &[u8; 8] = b"verity\0\0";

/// What a verity superblock says (the fields the node side checks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Format version (1).
    pub version: u32,
    /// Hash type (1: salt first, as veritysetup's default).
    pub hash_type: u32,
    /// Hash algorithm name, e.g. `sha256`.
    pub algorithm: String,
    /// Data block size in bytes.
    pub data_block_size: u32,
    /// Hash block size in bytes.
    pub hash_block_size: u32,
    /// Data blocks covered.
    pub data_blocks: u64,
    /// The salt.
    pub salt: Vec<u8>,
}

impl Superblock {
    /// Parses a superblock, `None` without the magic (no tree there).
    pub fn parse(b: &[u8]) -> Option<Superblock> {
        if b.len() < 512 || &b[..8] != MAGIC {
            return None;
        }
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let mut blocks = [0u8; 8];
        blocks.copy_from_slice(&b[72..80]);
        let salt_len = (u16::from_le_bytes([b[80], b[81]]) as usize).min(256);
        let algorithm = b[32..64].split(|&c| c == 0).next().unwrap_or_default();
        Some(Superblock {
            version: u32_at(8),
            hash_type: u32_at(12),
            algorithm: String::from_utf8_lossy(algorithm).into_owned(),
            data_block_size: u32_at(64),
            hash_block_size: u32_at(68),
            data_blocks: u64::from_le_bytes(blocks),
            salt: b[88..88 + salt_len].to_vec(),
        })
    }
}

/// Blocks per hash level for `data_blocks` of data, the level over the data
/// first; the last level is the single block the root hash is taken of.
pub fn levels(data_blocks: u64) -> Vec<u64> {
    let mut levels = Vec::new();
    let mut n = data_blocks.max(1);
    loop {
        let blocks = n.div_ceil(PER_BLOCK);
        levels.push(blocks);
        if blocks == 1 {
            return levels;
        }
        n = blocks;
    }
}

/// The hash of a block: `sha256(salt ‖ block)`.
pub fn salted(salt: &[u8], block: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// The 512-byte verity superblock (format 1), zero-padded to a block.
pub fn superblock(data_blocks: u64, salt: &[u8; 32], uuid: &[u8; 16]) -> Vec<u8> {
    let mut sb = vec![0u8; BLOCK as usize];
    sb[0..8].copy_from_slice(MAGIC);
    sb[8..12].copy_from_slice(&1u32.to_le_bytes()); // version
    sb[12..16].copy_from_slice(&1u32.to_le_bytes()); // hash type: normal (salt first)
    sb[16..32].copy_from_slice(uuid);
    sb[32..38].copy_from_slice(b"sha256");
    sb[64..68].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    sb[68..72].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    sb[72..80].copy_from_slice(&data_blocks.to_le_bytes());
    sb[80..82].copy_from_slice(&(salt.len() as u16).to_le_bytes());
    sb[88..88 + salt.len()].copy_from_slice(salt);
    sb
}

/// A dm-verity root hash (sha256).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RootHash(pub [u8; 32]);

impl RootHash {
    /// The hash, hex.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Reads a root hash from a file: one holding just the hex (as
    /// `preseed.roothash` beside the image), or a kernel command line
    /// (`/proc/cmdline`) with `preseed.roothash=HEX` among its words.
    pub fn from_file(path: &Path) -> Result<RootHash, RootHashError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| RootHashError::File { path: path.to_path_buf(), source })?;
        Self::from_text(&text, path)
    }

    /// [`RootHash::from_file`] of text already read (`path` names it in messages).
    pub fn from_text(text: &str, path: &Path) -> Result<RootHash, RootHashError> {
        if let Ok(root) = text.trim().parse() {
            return Ok(root);
        }
        let prefix = format!("{CMDLINE_PARAMETER}=");
        match text.split_whitespace().find_map(|w| w.strip_prefix(prefix.as_str())) {
            Some(hex) => hex.parse(),
            None => Err(RootHashError::NotIn { path: path.to_path_buf() }),
        }
    }
}

impl std::fmt::Debug for RootHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RootHash({})", self.hex())
    }
}

impl std::fmt::Display for RootHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

impl FromStr for RootHash {
    type Err = RootHashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || RootHashError::Bad { given: s.to_string() };
        let bytes = hex::decode(s).map_err(|_| bad())?;
        Ok(RootHash(bytes.try_into().map_err(|_| bad())?))
    }
}

/// Why a root hash could not be had.
#[derive(Debug, thiserror::Error)]
pub enum RootHashError {
    /// Not a sha256 root hash.
    #[error("{given:?} is not a dm-verity root hash (64 hex digits, as in preseed.roothash beside the image)")]
    Bad {
        /// What was given.
        given: String,
    },
    /// The root hash file could not be read.
    #[error("reading the root hash from {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The root hash file holds neither a hash nor the kernel parameter.
    #[error(
        "{path} holds neither a root hash nor `{CMDLINE_PARAMETER}=HEX`: give the node the root hash of its partition"
    )]
    NotIn {
        /// The file.
        path: PathBuf,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_parses_back() {
        let sb = Superblock::parse(&superblock(300, &[5; 32], &[6; 16])).unwrap();
        assert_eq!((sb.version, sb.hash_type, sb.algorithm.as_str()), (1, 1, "sha256"));
        assert_eq!((sb.data_block_size, sb.hash_block_size, sb.data_blocks), (4096, 4096, 300));
        assert_eq!(sb.salt, [5; 32]);
        assert!(Superblock::parse(&[0u8; 4096]).is_none());
        // 300 blocks: 3 hash blocks, then the top one.
        assert_eq!(levels(300), [3, 1]);
        assert_eq!(levels(1), [1]);
    }
}
