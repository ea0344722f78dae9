//! A dm-verity hash tree appended to a partition image, so one image carries
//! both the filesystem and what proves it: `veritysetup` format 1, sha256,
//! 4096-byte data and hash blocks, with a verity superblock.
//!
//! Layout after the (4096-padded) filesystem, at `hash_offset`: the
//! superblock block, then the hash levels, the level nearest the root first
//! (as veritysetup lays them out). Every hash is `sha256(salt ‖ block)`; the
//! root hash is that of the single top block. The salt and the superblock's
//! UUID are given by the caller (derived from the content), so the same
//! filesystem gives the same bytes.
//!
//! Memory stays bounded: each level is streamed from the file (the data, or
//! the level below) and written as its hash blocks fill, on all cores.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Data and hash block size.
pub const BLOCK: u64 = 4096;
const HASH: u64 = 32;
const PER_BLOCK: u64 = BLOCK / HASH;

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

/// Pads `image` to a 4096 multiple and appends the hash tree for it.
pub fn append(image: &Path, salt: &[u8; 32], uuid: &[u8; 16]) -> io::Result<VerityInfo> {
    let file = OpenOptions::new().read(true).write(true).open(image)?;
    let len = file.metadata()?.len();
    let data_blocks = len.div_ceil(BLOCK);
    let hash_offset = data_blocks * BLOCK;
    file.set_len(hash_offset)?;

    let levels = levels(data_blocks);
    // Positions: after the superblock block, the highest level first.
    let mut starts = vec![0u64; levels.len()];
    let mut at = hash_offset + BLOCK;
    for i in (0..levels.len()).rev() {
        starts[i] = at;
        at += levels[i] * BLOCK;
    }
    file.set_len(at)?;

    let mut source = (0u64, data_blocks);
    for (i, &blocks) in levels.iter().enumerate() {
        hash_level(&file, salt, source.0, source.1, starts[i])?;
        source = (starts[i], blocks);
    }
    let mut top = vec![0u8; BLOCK as usize];
    file.read_exact_at(&mut top, starts[levels.len() - 1])?;
    let root = salted(salt, &top);

    file.write_all_at(&superblock(data_blocks, salt, uuid), hash_offset)?;
    file.sync_all()?;
    Ok(VerityInfo {
        root_hash: hex::encode(root),
        hash_offset,
        data_blocks,
        salt: hex::encode(salt),
        hash_algorithm: "sha256".into(),
    })
}

/// Hashes `count` blocks starting at byte `from` into hash blocks written at
/// `to` (zero-padded), splitting the work by whole hash blocks over all cores.
fn hash_level(file: &File, salt: &[u8], from: u64, count: u64, to: u64) -> io::Result<()> {
    let out_blocks = count.div_ceil(PER_BLOCK);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let per_worker = out_blocks.div_ceil(workers).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..out_blocks.div_ceil(per_worker))
            .map(|w| {
                scope.spawn(move || -> io::Result<()> {
                    let first = w * per_worker;
                    let last = (first + per_worker).min(out_blocks);
                    let mut data = vec![0u8; BLOCK as usize];
                    let mut out = vec![0u8; BLOCK as usize];
                    for hb in first..last {
                        out.fill(0);
                        for k in 0..PER_BLOCK {
                            let b = hb * PER_BLOCK + k;
                            if b >= count {
                                break;
                            }
                            file.read_exact_at(&mut data, from + b * BLOCK)?;
                            let at = (k * HASH) as usize;
                            out[at..at + HASH as usize].copy_from_slice(&salted(salt, &data));
                        }
                        file.write_all_at(&out, to + hb * BLOCK)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|_| Err(io::Error::other("hashing thread panicked"))))
    })
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
fn superblock(data_blocks: u64, salt: &[u8; 32], uuid: &[u8; 16]) -> Vec<u8> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_of_one_block_is_one_level_and_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        std::fs::write(&img, vec![7u8; 1000]).unwrap();
        let a = append(&img, &[1; 32], &[2; 16]).unwrap();
        assert_eq!((a.data_blocks, a.hash_offset), (1, 4096));
        // superblock + one hash block
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 3 * 4096);
        let mut block = vec![0u8; 4096];
        block[..1000].fill(7);
        let mut top = vec![0u8; 4096];
        top[..32].copy_from_slice(&salted(&[1; 32], &block));
        assert_eq!(a.root_hash, hex::encode(salted(&[1; 32], &top)));
    }

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
