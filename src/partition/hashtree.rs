//! Appending the dm-verity hash tree (format: [`crate::partition::verity`])
//! to a written partition image, so one image carries both the filesystem
//! and what proves it: `preseed bundle` appends it, `preseed pull` rebuilds
//! it rather than download it. The salt and the superblock's UUID are given by the
//! caller (derived from the content), so the same filesystem gives the same
//! bytes.
//!
//! Memory stays bounded: each level is streamed from the file (the data, or
//! the level below) and written as its hash blocks fill, on all cores.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::partition::verity::{levels, salted, superblock, VerityInfo, BLOCK, HASH, PER_BLOCK};

/// Pads `image` to a 4096 multiple and appends the hash tree for it.
pub fn append(image: &Path, salt: &[u8; 32], uuid: &[u8; 16]) -> io::Result<VerityInfo> {
    let file = OpenOptions::new().read(true).write(true).open(image)?;
    let len = file.metadata()?.len();
    let hash_offset = len.div_ceil(BLOCK) * BLOCK;
    file.set_len(hash_offset)?;
    let info = append_at(&file, hash_offset, salt, uuid, None)?;
    file.sync_all()?;
    Ok(info)
}

/// Writes the hash tree for the first `data_len` bytes (a 4096 multiple) of
/// `file` right after them, with positioned writes only, so `file` may be a
/// block device (`preseed pull` into a slot). `block0`, if given, stands for
/// the file's first data block (a pull writes that block last). Not flushed.
pub fn append_at(
    file: &File,
    data_len: u64,
    salt: &[u8; 32],
    uuid: &[u8; 16],
    block0: Option<&[u8]>,
) -> io::Result<VerityInfo> {
    if !data_len.is_multiple_of(BLOCK) {
        return Err(io::Error::other(format!("verity data length {data_len} is not a multiple of {BLOCK}")));
    }
    let data_blocks = data_len / BLOCK;
    let hash_offset = data_len;
    let levels = levels(data_blocks);
    // Positions: after the superblock block, the highest level first.
    let mut starts = vec![0u64; levels.len()];
    let mut at = hash_offset + BLOCK;
    for i in (0..levels.len()).rev() {
        starts[i] = at;
        at += levels[i] * BLOCK;
    }
    let mut source = (0u64, data_blocks);
    for (i, &blocks) in levels.iter().enumerate() {
        hash_level(file, salt, source.0, source.1, starts[i], if i == 0 { block0 } else { None })?;
        source = (starts[i], blocks);
    }
    let mut top = vec![0u8; BLOCK as usize];
    file.read_exact_at(&mut top, starts[levels.len() - 1])?;
    let root = salted(salt, &top);

    file.write_all_at(&superblock(data_blocks, salt, uuid), hash_offset)?;
    Ok(VerityInfo {
        root_hash: hex::encode(root),
        hash_offset,
        data_blocks,
        salt: hex::encode(salt),
        hash_algorithm: "sha256".into(),
    })
}

/// Bytes of the whole image (data, superblock block, every level) for
/// `data_len` data bytes.
pub fn image_len(data_len: u64) -> u64 {
    data_len + BLOCK + levels(data_len / BLOCK).iter().sum::<u64>() * BLOCK
}

/// Hashes `count` blocks starting at byte `from` into hash blocks written at
/// `to` (zero-padded), splitting the work by whole hash blocks over all cores;
/// `block0` stands for the first of them.
fn hash_level(file: &File, salt: &[u8], from: u64, count: u64, to: u64, block0: Option<&[u8]>) -> io::Result<()> {
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
                            let at = (k * HASH) as usize;
                            let hash = match block0 {
                                Some(first) if b == 0 => salted(salt, first),
                                _ => {
                                    file.read_exact_at(&mut data, from + b * BLOCK)?;
                                    salted(salt, &data)
                                }
                            };
                            out[at..at + HASH as usize].copy_from_slice(&hash);
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
        assert_eq!(image_len(4096), 3 * 4096);
        let mut block = vec![0u8; 4096];
        block[..1000].fill(7);
        let mut top = vec![0u8; 4096];
        top[..32].copy_from_slice(&salted(&[1; 32], &block));
        assert_eq!(a.root_hash, hex::encode(salted(&[1; 32], &top)));
    }
}
