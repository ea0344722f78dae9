//! Opening what a partition (or a preload directory) holds as untrusted
//! input: only regular files, without blocking on a FIFO or a device, without
//! following a symbolic link at the last step (a crafted partition could
//! point one anywhere on the node), and never reading more than a limit into
//! memory.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Opens `path` for reading if it is a regular file: `O_NONBLOCK` so that a
/// FIFO or device cannot hang the open, `O_NOFOLLOW` so that a symbolic link
/// is refused, then `fstat` on what was opened.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => io::Error::new(
                io::ErrorKind::InvalidInput,
                "a symbolic link, not a regular file (a partition's files are never links)",
            ),
            _ => e,
        })?;
    let t = file.metadata()?.file_type();
    if t.is_file() {
        return Ok(file);
    }
    let what = if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{what}, not a regular file")))
}

/// Reads a whole regular file (see [`open_regular`]) of at most `limit` bytes.
pub fn read_capped(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let file = open_regular(path)?;
    let len = file.metadata()?.len();
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{len} bytes, more than the {limit} bytes such a file may have"),
        ));
    }
    let mut out = Vec::with_capacity(len as usize);
    // `take`: a file that grows meanwhile still stops at the limit.
    file.take(limit).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_open_and_nothing_blocks() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"12345").unwrap();
        assert_eq!(read_capped(&f, 5).unwrap(), b"12345");
        assert!(read_capped(&f, 4).unwrap_err().to_string().contains("more than the 4 bytes"));
        let fifo = d.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(open_regular(&fifo).unwrap_err().to_string().contains("a FIFO"));
        assert!(open_regular(d.path()).unwrap_err().to_string().contains("a directory"));
        assert!(open_regular(Path::new("/dev/zero")).unwrap_err().to_string().contains("a device"));
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert!(open_regular(&link).unwrap_err().to_string().contains("symbolic link"));
    }
}
