//! The target side of a pull: the new partition written with positioned
//! writes, its first block held back until the whole image is proven.
//!
//! A regular file is written under a temp name beside it and renamed when
//! proven; a block device (the inactive slot) gets its first block zeroed
//! before anything else, so until the proof the slot holds no filesystem any
//! kernel would mount. The proof reads the image back: sha256 of every byte,
//! and for a verity release the root hash of the rebuilt tree.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use super::PullError;
use crate::digest::{Digest, Hasher};
use crate::partition::hashtree;
use crate::partition::release::Plan;
use crate::partition::verity::BLOCK;

/// The image being written.
pub(super) struct Target {
    /// Where it ends up.
    path: PathBuf,
    /// What is written: the temp file, or the device.
    file: File,
    /// The temp file's name, for a regular file target.
    temp: Option<PathBuf>,
    /// The image's first block, written last.
    block0: std::sync::Mutex<Vec<u8>>,
}

impl Target {
    /// Opens `path` for an image of `size` bytes.
    pub(super) fn open(path: &Path, size: u64) -> Result<Target, PullError> {
        let err = |source| PullError::Target { path: path.to_path_buf(), source };
        let device = fs::metadata(path).map(|m| m.file_type().is_block_device()).unwrap_or(false);
        let (file, temp) = if device {
            let mut file = OpenOptions::new().read(true).write(true).open(path).map_err(err)?;
            let capacity = file.seek(SeekFrom::End(0)).map_err(err)?;
            if capacity < size {
                return Err(PullError::TooSmall { path: path.to_path_buf(), capacity, size });
            }
            file.write_all_at(&vec![0u8; BLOCK as usize], 0).map_err(err)?;
            file.sync_data().map_err(err)?;
            (file, None)
        } else {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let temp = path.with_file_name(format!(".{name}.preseed-pull"));
            let file =
                OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&temp).map_err(err)?;
            file.set_len(size).map_err(err)?;
            (file, Some(temp))
        };
        Ok(Target { path: path.to_path_buf(), file, temp, block0: std::sync::Mutex::new(vec![0u8; BLOCK as usize]) })
    }

    /// Writes `bytes` at image offset `at` (the first block to memory).
    pub(super) fn write_at(&self, mut bytes: &[u8], mut at: u64) -> Result<(), PullError> {
        if at < BLOCK {
            let n = bytes.len().min((BLOCK - at) as usize);
            let mut first = self.block0.lock().unwrap_or_else(|e| e.into_inner());
            first[at as usize..at as usize + n].copy_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            at += n as u64;
        }
        if bytes.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(bytes, at).map_err(|source| PullError::Target { path: self.path.clone(), source })
    }

    /// Rebuilds the verity tree the plan asks for; its root hash.
    pub(super) fn verity(&self, plan: &Plan) -> Result<Option<String>, PullError> {
        let Some(v) = &plan.verity else { return Ok(None) };
        let (mut salt, mut uuid) = ([0u8; 32], [0u8; 16]);
        hex::decode_to_slice(&v.salt, &mut salt).map_err(|e| self.err(io::Error::other(e)))?;
        hex::decode_to_slice(&v.uuid, &mut uuid).map_err(|e| self.err(io::Error::other(e)))?;
        let first = self.block0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let info =
            hashtree::append_at(&self.file, plan.data_bytes, &salt, &uuid, Some(&first)).map_err(|e| self.err(e))?;
        Ok(Some(info.root_hash))
    }

    fn err(&self, source: io::Error) -> PullError {
        PullError::Target { path: self.path.clone(), source }
    }

    /// sha256 of the image as it is on disk (with the held-back first block).
    pub(super) fn digest(&self, size: u64) -> Result<Digest, PullError> {
        self.file.sync_data().map_err(|e| self.err(e))?;
        let mut h = Hasher::new();
        h.update(&self.block0.lock().unwrap_or_else(|e| e.into_inner())[..BLOCK.min(size) as usize]);
        let mut buf = vec![0u8; 1 << 20];
        let mut at = BLOCK.min(size);
        while at < size {
            let n = buf.len().min((size - at) as usize);
            self.file.read_exact_at(&mut buf[..n], at).map_err(|e| self.err(e))?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        Ok(h.finish())
    }

    /// The proven image in place: the first block written and flushed, a
    /// file renamed over `path` (and the rename made durable).
    pub(super) fn commit(mut self) -> Result<(), PullError> {
        let first = std::mem::take(&mut *self.block0.lock().unwrap_or_else(|e| e.into_inner()));
        self.file.write_all_at(&first, 0).map_err(|e| self.err(e))?;
        self.file.sync_all().map_err(|e| self.err(e))?;
        if let Some(temp) = self.temp.take() {
            fs::rename(&temp, &self.path).map_err(|e| self.err(e))?;
            let dir = match self.path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| self.err(e))?;
        }
        Ok(())
    }
}

impl Drop for Target {
    /// A pull that did not prove its image leaves no file under any name.
    fn drop(&mut self) {
        if let Some(temp) = &self.temp {
            let _ = fs::remove_file(temp);
        }
    }
}
