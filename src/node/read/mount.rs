//! Mounting the partition read-only: an image file through a loop device, or
//! a block device directly, as erofs or squashfs told apart by superblock
//! magic. Anything else is refused before anything is attached or mounted.
//! The mount goes away when [`Mounted`] is dropped, unless it is kept
//! ([`Mounted::keep`], for `preseed place --overlay`).
//!
//! The syscalls sit behind [`Sys`] so the decision logic is testable
//! without root.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::node::sys::Sys;
use crate::partition::Format;

/// Why the partition could not be mounted.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The file or device could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The partition.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Neither erofs nor squashfs magic.
    #[error("{path}: neither an erofs nor a squashfs filesystem (no superblock magic); nothing mounted")]
    UnknownFormat {
        /// The partition.
        path: PathBuf,
    },
    /// Attaching the loop device failed.
    #[error("{path}: cannot attach a loop device: {source}")]
    Loop {
        /// The image file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// mount(2) failed.
    #[error("mounting {device} ({format}) on {target} failed: {source}{hint}")]
    Mount {
        /// What was mounted.
        device: PathBuf,
        /// Its format.
        format: Format,
        /// Where.
        target: PathBuf,
        /// The underlying error.
        source: io::Error,
        /// A hint for common causes.
        hint: &'static str,
    },
}

/// A mounted partition; unmounted (and a temp mount point removed) on drop.
pub struct Mounted {
    dir: PathBuf,
    format: Format,
    sys: Arc<dyn Sys>,
    /// The mount point is a temp directory of ours.
    temp: bool,
}

impl Mounted {
    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The filesystem format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Leaves the partition mounted after this process: the loop device
    /// (autoclear) goes when the mount is unmounted.
    pub fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.sys.unmount(&self.dir);
        if self.temp {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// Reads the superblock region and names the format, if any.
pub fn sniff(path: &Path) -> Result<Format, MountError> {
    let io_err = |source| MountError::Io { path: path.to_path_buf(), source };
    let f = File::open(path).map_err(io_err)?;
    let mut head = vec![0u8; 4096];
    let mut got = 0;
    while got < head.len() {
        match f.read_at(&mut head[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    Format::sniff(&head[..got]).ok_or_else(|| MountError::UnknownFormat { path: path.to_path_buf() })
}

/// Mounts an image file (`loop = true`) or a block device read-only on a
/// fresh directory.
pub fn mount(path: &Path, loop_file: bool, sys: Arc<dyn Sys>) -> Result<Mounted, MountError> {
    mount_on(path, loop_file, None, sys)
}

/// [`mount`] on the existing directory `target` (left in place on drop),
/// or on a fresh temp directory.
pub fn mount_on(path: &Path, loop_file: bool, target: Option<&Path>, sys: Arc<dyn Sys>) -> Result<Mounted, MountError> {
    let format = sniff(path)?;
    let handle = if loop_file {
        Some(sys.attach_loop(path).map_err(|source| MountError::Loop { path: path.to_path_buf(), source })?)
    } else {
        None
    };
    let device = handle.as_ref().map(|h| h.device.clone()).unwrap_or_else(|| path.to_path_buf());
    let temp = target.is_none();
    let dir = match target {
        Some(t) => t.to_path_buf(),
        None => tempfile::Builder::new()
            .prefix("preseed-mnt-")
            .tempdir()
            .map_err(|source| MountError::Io { path: std::env::temp_dir(), source })?
            .keep(),
    };
    if let Err(source) = sys.mount_ro(&device, &dir, format.extension()) {
        if temp {
            let _ = std::fs::remove_dir(&dir);
        }
        let hint = match source.raw_os_error() {
            Some(libc::ENODEV) => {
                " (is the kernel's filesystem driver loaded? try `modprobe erofs` or `modprobe squashfs`)"
            }
            Some(libc::EPERM) => " (mounting needs root or CAP_SYS_ADMIN)",
            _ => "",
        };
        return Err(MountError::Mount { device, format, target: dir, source, hint });
    }
    // The mount now holds the loop device; our handle may go.
    drop(handle);
    Ok(Mounted { dir, format, sys, temp })
}

/// The filesystem type mounted on `path`, if it is a mount point (the top
/// mount where several are stacked), from `/proc/self/mountinfo`.
pub fn fs_type_at(path: &Path) -> Option<String> {
    let want = std::fs::canonicalize(path).ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut found = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else { continue };
        if fields.len() > dash + 1 && fields.len() > 4 && Path::new(&unescape(fields[4])) == want {
            found = Some(fields[dash + 1].to_string());
        }
    }
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let b = field.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use crate::node::sys::LoopHandle;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Sys for Recorder {
        fn attach_loop(&self, file: &Path) -> io::Result<LoopHandle> {
            self.0.lock().unwrap().push(format!("loop {}", file.display()));
            Ok(LoopHandle::detached("/dev/loop9".into()))
        }
        fn mount_ro(&self, device: &Path, _target: &Path, fstype: &str) -> io::Result<()> {
            self.0.lock().unwrap().push(format!("mount {} {fstype}", device.display()));
            Ok(())
        }
        fn unmount(&self, _target: &Path) -> io::Result<()> {
            self.0.lock().unwrap().push("umount".into());
            Ok(())
        }
        fn mount_overlay(&self, _target: &Path, _options: &str) -> io::Result<()> {
            unreachable!("not used by mount")
        }
        fn whiteout(&self, _path: &Path) -> io::Result<()> {
            unreachable!("not used by mount")
        }
        fn try_lock(&self, _file: &File) -> io::Result<bool> {
            unreachable!("not used by mount")
        }
        fn sync_fs(&self, _file: &File) -> io::Result<()> {
            unreachable!("not used by mount")
        }
        fn start_writeback(&self, _file: &File, _offset: u64, _len: u64) {}
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape("/var/lib/a\\040b"), "/var/lib/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/end\\04"), "/end\\04");
    }

    #[test]
    fn the_root_is_a_mount_point() {
        assert!(fs_type_at(Path::new("/")).is_some());
        assert!(fs_type_at(Path::new("/nonexistent-preseed-path")).is_none());
    }

    #[test]
    fn unknown_format_mounts_nothing() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), vec![0u8; 8192]).unwrap();
        let rec = Arc::new(Recorder::default());
        let err = mount(f.path(), true, rec.clone()).err().unwrap();
        assert!(matches!(err, MountError::UnknownFormat { .. }), "{err}");
        assert!(err.to_string().contains("neither an erofs nor a squashfs"));
        assert!(rec.0.lock().unwrap().is_empty());
    }

    #[test]
    fn squashfs_image_is_loop_mounted_and_unmounted_on_drop() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut bytes = vec![0u8; 4096];
        bytes[..4].copy_from_slice(b"hsqs");
        std::fs::write(f.path(), bytes).unwrap();
        let rec = Arc::new(Recorder::default());
        let m = mount(f.path(), true, rec.clone()).unwrap();
        assert_eq!(m.format(), Format::Squashfs);
        let dir = m.path().to_path_buf();
        assert!(dir.is_dir());
        drop(m);
        assert!(!dir.exists());
        let calls = rec.0.lock().unwrap().clone();
        assert_eq!(calls[1], "mount /dev/loop9 squashfs");
        assert_eq!(calls[2], "umount");
    }
}
