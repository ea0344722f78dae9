//! Opening a partition on the node, the one way `load`, `place` and `serve`
//! share: an image file (loop-mounted), a block device (mounted), or a
//! directory taken as it is (an already mounted partition or a preload
//! directory). The mount, if any, goes away when [`Opened`] is dropped.
//!
//! With a root hash ([`OpenOptions::verity_root_hash`]) a partition is
//! opened through dm-verity ([`super::verity`]) and that device is
//! mounted: the loop device (for an image file), the verity device and the
//! mount all go away with [`Opened`], also when opening fails halfway.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::mount::{self, MountError, Mounted};
use super::verity::{VerityDevice, VerityError};
use crate::node::sys::Sys;
use crate::partition::verity::RootHash;

/// Where the images come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A partition image file, loop-mounted.
    Image(PathBuf),
    /// A block device holding the partition.
    Device(PathBuf),
    /// An already mounted partition, or a preload directory.
    Dir(PathBuf),
}

impl Source {
    /// What a path names: a regular file is an image, a directory a
    /// directory, anything else (a block device) a device.
    pub fn detect(path: &Path) -> Source {
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => Source::Image(path.to_path_buf()),
            Ok(m) if m.is_dir() => Source::Dir(path.to_path_buf()),
            _ => Source::Device(path.to_path_buf()),
        }
    }

    /// A stable name for the source ([`Opened::id`]): an image file or
    /// directory canonicalized, a device path as given.
    pub fn id(&self) -> String {
        match self {
            Source::Image(p) | Source::Dir(p) => {
                std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()).display().to_string()
            }
            Source::Device(p) => p.display().to_string(),
        }
    }

    /// The path as given.
    pub fn path(&self) -> &Path {
        match self {
            Source::Image(p) | Source::Device(p) | Source::Dir(p) => p,
        }
    }
}

/// How to open a source.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Open the partition through dm-verity, checked against this root hash.
    pub verity_root_hash: Option<RootHash>,
    /// Mount it on this existing directory rather than a temp one.
    pub mount_at: Option<PathBuf>,
}

/// Why a source could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The partition could not be mounted.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// A `--dir` source that is not a directory.
    #[error("{0}: not a directory")]
    NotADirectory(PathBuf),
    /// The dm-verity device could not be set up (wrong root hash, no tree…).
    #[error(transparent)]
    Verity(#[from] VerityError),
    /// A root hash given for a directory.
    #[error("{0}: a directory cannot be checked against a root hash: give the partition (--image or --device)")]
    VerityNeedsPartition(PathBuf),
    /// The verified partition's first blocks read as EIO.
    #[error("{partition} (through {device}): {}", super::verity::CORRUPT)]
    Corrupt {
        /// The partition as named.
        partition: PathBuf,
        /// The verity device.
        device: PathBuf,
    },
}

/// An open source: its root directory, kept mounted while this lives.
pub struct Opened {
    // Dropped in this order: the mount, then the verity device under it.
    mounted: Option<Mounted>,
    verity: Option<VerityDevice>,
    root: PathBuf,
    id: String,
}

impl Opened {
    /// The directory holding `preseed.json` and the tarballs.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A stable name for the source, recorded on what is loaded from it:
    /// an image file or directory canonicalized, a device path as given
    /// (`/dev/disk/by-partlabel/…` is stable across partition versions
    /// where `/dev/vdb` may not be).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The mount, when the source is a partition (not a directory).
    pub fn mounted(&self) -> Option<&Mounted> {
        self.mounted.as_ref()
    }

    /// The dm-verity device the partition is read through, if any: then
    /// an EIO reading it means the partition is corrupt.
    pub fn verity(&self) -> Option<&VerityDevice> {
        self.verity.as_ref()
    }

    /// Leaves the partition mounted (and its dm-verity device open) after
    /// this process, for a mount that outlives it (`place --overlay`).
    pub fn keep(self) {
        let Opened { mounted, verity, .. } = self;
        if let Some(m) = mounted {
            m.keep();
        }
        std::mem::forget(verity);
    }
}

/// Opens `source` read-only with the kernel's mount syscalls.
pub fn open(source: &Source) -> Result<Opened, OpenError> {
    open_with(source, Arc::new(crate::node::sys::Linux))
}

/// [`open`] with the given mount syscalls.
pub fn open_with(source: &Source, sys: Arc<dyn Sys>) -> Result<Opened, OpenError> {
    open_with_options(source, &OpenOptions::default(), sys)
}

/// [`open_with`] with options (a dm-verity root hash).
pub fn open_with_options(source: &Source, opts: &OpenOptions, sys: Arc<dyn Sys>) -> Result<Opened, OpenError> {
    let opened = |m: Mounted, verity: Option<VerityDevice>, id: String| Opened {
        root: m.path().to_path_buf(),
        mounted: Some(m),
        verity,
        id,
    };
    let at = opts.mount_at.as_deref();
    Ok(match (source, &opts.verity_root_hash) {
        (Source::Image(p), None) => opened(mount::mount_on(p, true, at, sys)?, None, source.id()),
        (Source::Device(p), None) => opened(mount::mount_on(p, false, at, sys)?, None, source.id()),
        (Source::Image(p), Some(root)) => {
            // Held until the verity device holds the loop device; it
            // detaches itself when that goes.
            let handle = sys.attach_loop(p).map_err(|source| MountError::Loop { path: p.clone(), source })?;
            let dm = VerityDevice::open(p, &handle.device, root)?;
            let m = mount_verified(&dm, at, sys)?;
            drop(handle);
            opened(m, Some(dm), source.id())
        }
        (Source::Device(p), Some(root)) => {
            let dm = VerityDevice::open(p, p, root)?;
            let m = mount_verified(&dm, at, sys)?;
            opened(m, Some(dm), source.id())
        }
        (Source::Dir(p), Some(_)) => return Err(OpenError::VerityNeedsPartition(p.clone())),
        (Source::Dir(p), None) => {
            if !p.is_dir() {
                return Err(OpenError::NotADirectory(p.clone()));
            }
            Opened { mounted: None, verity: None, root: p.clone(), id: source.id() }
        }
    })
}

/// Mounts the verity device; an EIO means the blocks the filesystem
/// starts with do not match the tree.
fn mount_verified(dm: &VerityDevice, at: Option<&Path>, sys: Arc<dyn Sys>) -> Result<Mounted, OpenError> {
    mount::mount_on(dm.path(), false, at, sys).map_err(|e| {
        if super::verity::is_eio(&e) {
            OpenError::Corrupt { partition: dm.partition().to_path_buf(), device: dm.path().to_path_buf() }
        } else {
            e.into()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_hash_for_a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let opts = OpenOptions { verity_root_hash: Some("ab".repeat(32).parse().unwrap()), mount_at: None };
        let e = open_with_options(&Source::Dir(dir.path().to_path_buf()), &opts, Arc::new(crate::node::sys::Linux))
            .err()
            .unwrap();
        assert!(e.to_string().contains("cannot be checked against a root hash"), "{e}");
    }
}
