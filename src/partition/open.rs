//! Opening a partition on the node, the one way `load`, `place` and `serve`
//! share: an image file (loop-mounted), a block device (mounted), or a
//! directory taken as it is (an already mounted partition or a preload
//! directory). The mount, if any, goes away when [`Opened`] is dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::mount::{self, MountError, MountSys, Mounted};

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

/// Why a source could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The partition could not be mounted.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// A `--dir` source that is not a directory.
    #[error("{0}: not a directory")]
    NotADirectory(PathBuf),
}

/// An open source: its root directory, kept mounted while this lives.
pub struct Opened {
    mounted: Option<Mounted>,
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
}

/// Opens `source` read-only with the kernel's mount syscalls.
pub fn open(source: &Source) -> Result<Opened, OpenError> {
    open_with(source, Arc::new(mount::LinuxMount))
}

/// [`open`] with the given mount syscalls.
pub fn open_with(source: &Source, sys: Arc<dyn MountSys>) -> Result<Opened, OpenError> {
    let canonical = |p: &PathBuf| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()).display().to_string();
    Ok(match source {
        Source::Image(p) => {
            let m = mount::mount(p, true, sys)?;
            Opened { root: m.path().to_path_buf(), mounted: Some(m), id: canonical(p) }
        }
        Source::Device(p) => {
            let m = mount::mount(p, false, sys)?;
            Opened { root: m.path().to_path_buf(), mounted: Some(m), id: p.display().to_string() }
        }
        Source::Dir(p) => {
            if !p.is_dir() {
                return Err(OpenError::NotADirectory(p.clone()));
            }
            Opened { mounted: None, root: p.clone(), id: canonical(p) }
        }
    })
}
