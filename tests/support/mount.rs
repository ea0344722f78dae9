//! Read-only loop mounts of partition images with the kernel's drivers,
//! unmounted on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted partition image.
pub struct Mounted {
    dir: tempfile::TempDir,
}

impl Mounted {
    /// Mounts `image` (`erofs` or `squashfs`) read-only through a loop device.
    pub fn new(image: &Path, fstype: &str) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        let out =
            Command::new("mount").args(["-t", fstype, "-o", "loop,ro"]).arg(image).arg(dir.path()).output().unwrap();
        assert!(out.status.success(), "mount {}: {}", image.display(), String::from_utf8_lossy(&out.stderr));
        Mounted { dir }
    }

    /// The mount point.
    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}
