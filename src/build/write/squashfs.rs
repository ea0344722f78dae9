//! squashfs partition images through backhand.
//!
//! Owns turning a [`Tree`] into a squashfs 4.0 image that the kernel driver
//! mounts: every file is streamed from its planned segments one block at a
//! time (no staging copy, memory bounded by a block plus the metadata tables),
//! written to a temp file next to the output and renamed into place only once
//! complete.
//!
//! Choices, and why:
//! * Data is stored, not compressed: it is mostly already-compressed layers,
//!   so deflate costs CPU and gains almost nothing (see [`Compression`]).
//! * backhand's duplicate-file detection is off: it matches files by length
//!   and a 64-bit xxHash, which is not collision-resistant, and registry
//!   content is not ours to trust. Identical tarballs are stored twice.
//! * Deterministic: mtime 0 everywhere, uid/gid 0, dirs 0755, files 0644,
//!   entries in name order. The same tree gives the same bytes.

use std::fmt;
use std::fs::{File, Permissions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use backhand::compression::{CompressionOptions, Compressor, Gzip};
use backhand::{BackhandError, FilesystemCompressor, FilesystemWriter, NodeHeader};

use crate::build::layout::tree::{Node, PlannedReader, Tree};

/// Statistics of a written image.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Bytes of the image file (including the padding to 4 KiB).
    pub image_bytes: u64,
}

/// How data and metadata blocks are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// Every block stored as is (what `mksquashfs -noI -noD -noF -noX`
    /// produces). The superblock still names gzip, which the kernel always
    /// has, but no block needs it. Layers are compressed already: on a tree
    /// of gzip tarballs, gzip level 1 saved 0.2% and level 9 1.1% of the
    /// image, for 10 and 18 times the write time.
    #[default]
    Store,
    /// zlib/gzip at `level` (1..=9); a block that does not shrink is still
    /// stored as is.
    Gzip {
        /// Compression level, 1 (fastest) to 9 (smallest).
        level: u32,
    },
}

/// How to write the image.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Block storage.
    pub compression: Compression,
}

/// Errors of the squashfs writer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A name squashfs cannot hold (empty, `.`, `..`, a `/` or NUL, or longer
    /// than 256 bytes).
    #[error("{path:?}: not a valid squashfs entry name")]
    InvalidName {
        /// Path of the entry inside the partition.
        path: String,
    },
    /// Reading the bytes of a planned file failed (a blob missing from the
    /// cache, or shorter than planned).
    #[error("{file}: reading its planned content: {source}")]
    Read {
        /// Path of the file inside the partition.
        file: String,
        /// The error.
        source: io::Error,
    },
    /// Creating, writing or renaming the image file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// Path of the file concerned.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// backhand refused to build the image.
    #[error("{}: squashfs writer failed: {reason}", path.display())]
    Backhand {
        /// The image being written.
        path: PathBuf,
        /// What backhand reported.
        reason: &'static str,
    },
    /// Invalid [`Options`].
    #[error("invalid squashfs options: {0}")]
    Options(&'static str),
}

const DIR_MODE: u16 = 0o755;
const FILE_MODE: u16 = 0o644;
/// squashfs stores a name length minus one in 8 bits.
const MAX_NAME: usize = 256;

/// Writes `tree` as a squashfs image at `out`, with default [`Options`].
pub fn write(tree: &Tree, out: &Path) -> Result<Stats, Error> {
    write_with(tree, out, &Options::default())
}

/// Writes `tree` as a squashfs image at `out`.
pub fn write_with(tree: &Tree, out: &Path, options: &Options) -> Result<Stats, Error> {
    let mut fs = FilesystemWriter::default();
    fs.set_time(0);
    fs.set_root_mode(DIR_MODE);
    fs.set_root_uid(0);
    fs.set_root_gid(0);
    fs.set_only_root_id();
    // The flag's name is inverted: `true` means "detect duplicates".
    fs.set_no_duplicate_files(false);
    configure_compression(&mut fs, options.compression)?;
    add_dir(&mut fs, tree, "")?;

    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let tmp = tempfile::Builder::new().prefix(".preseed-squashfs.").tempfile_in(dir).map_err(io_err(dir))?;

    let mut w = BufWriter::new(tmp.as_file());
    let image_bytes = match fs.write(&mut w) {
        Ok((_, bytes)) => bytes,
        Err(e) => return Err(from_backhand(e, tmp.path())),
    };
    w.flush().map_err(io_err(tmp.path()))?;
    drop(w);
    if options.compression == Compression::Store {
        mark_stored(tmp.as_file()).map_err(io_err(tmp.path()))?;
    }
    let file = tmp.as_file();
    file.set_permissions(Permissions::from_mode(0o644)).map_err(io_err(tmp.path()))?;
    file.sync_all().map_err(io_err(tmp.path()))?;
    tmp.persist(out).map_err(|e| Error::Io { path: out.to_path_buf(), source: e.error })?;
    if let Ok(d) = File::open(dir) {
        // Make the rename durable; a failure here leaves a complete image anyway.
        let _ = d.sync_all();
    }
    Ok(Stats { image_bytes })
}

fn configure_compression(fs: &mut FilesystemWriter<'_, '_, '_>, c: Compression) -> Result<(), Error> {
    let (level, emit) = match c {
        // zlib level 0 emits stored deflate blocks, always a few bytes longer
        // than the input, so backhand keeps every block as is and flags it
        // uncompressed. The options are not written: level 0 is not a valid
        // gzip option for squashfs-tools, and nothing needs to decompress.
        Compression::Store => (0, false),
        Compression::Gzip { level: level @ 1..=9 } => (level, true),
        Compression::Gzip { .. } => return Err(Error::Options("gzip level must be 1..=9")),
    };
    let gzip = Gzip { compression_level: level, window_size: 15, strategies: 0 };
    let compressor = FilesystemCompressor::new(Compressor::Gzip, Some(CompressionOptions::Gzip(gzip)))
        .map_err(|_| Error::Options("backhand rejected the gzip options"))?;
    fs.set_compressor(compressor);
    fs.set_emit_compression_options(emit);
    Ok(())
}

/// Sets the superblock flags saying inodes, data and fragments are stored
/// uncompressed, as `mksquashfs -noI -noD -noF` does, so tools report what the
/// image holds. backhand does not expose the flags; readers (the kernel
/// included) go by the per-block flags, which are already right.
fn mark_stored(mut file: &File) -> io::Result<()> {
    // squashfs 4.0 superblock: u16 flags at byte 24, little-endian.
    const FLAGS_OFFSET: u64 = 24;
    const STORED: u16 = 0x0001 | 0x0002 | 0x0008; // inodes, data, fragments
    let mut buf = [0u8; 2];
    file.seek(SeekFrom::Start(FLAGS_OFFSET))?;
    file.read_exact(&mut buf)?;
    let flags = u16::from_le_bytes(buf) | STORED;
    file.seek(SeekFrom::Start(FLAGS_OFFSET))?;
    file.write_all(&flags.to_le_bytes())
}

fn add_dir<'t>(fs: &mut FilesystemWriter<'_, '_, 't>, tree: &'t Tree, prefix: &str) -> Result<(), Error> {
    for (name, node) in &tree.entries {
        let path = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
        if !valid_name(name) {
            return Err(Error::InvalidName { path });
        }
        let pushed = match node {
            Node::Dir(_) => fs.push_dir(&path, header(DIR_MODE)),
            Node::File(file) => {
                let reader = NamedReader { inner: file.reader(), path: path.clone() };
                fs.push_file(reader, &path, header(FILE_MODE))
            }
        };
        // The tree is a map of single components, so backhand can only
        // object to the name itself.
        pushed.map_err(|_| Error::InvalidName { path: path.clone() })?;
        if let Node::Dir(sub) = node {
            add_dir(fs, sub, &path)?;
        }
    }
    Ok(())
}

fn header(mode: u16) -> NodeHeader {
    NodeHeader::new(mode, 0, 0, 0)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= MAX_NAME
        && !name.bytes().any(|b| b == b'/' || b == 0)
}

/// A file's reader that tags its I/O errors with the file's partition path,
/// so an error coming back out of backhand still says which file failed.
struct NamedReader<'t> {
    inner: PlannedReader<'t>,
    path: String,
}

impl Read for NamedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner
            .read(buf)
            .map_err(|source| io::Error::new(source.kind(), ReadFailed { file: self.path.clone(), source }))
    }
}

#[derive(Debug)]
struct ReadFailed {
    file: String,
    source: io::Error,
}

impl fmt::Display for ReadFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.source)
    }
}

impl std::error::Error for ReadFailed {}

fn from_backhand(e: BackhandError, image: &Path) -> Error {
    use BackhandError as B;
    let reason = match e {
        B::StdIo(io) => {
            if io.get_ref().is_some_and(|inner| inner.is::<ReadFailed>()) {
                let inner = io.into_inner().expect("checked above");
                let failed = inner.downcast::<ReadFailed>().expect("checked above");
                return Error::Read { file: failed.file, source: failed.source };
            }
            return Error::Io { path: image.to_path_buf(), source: io };
        }
        B::TryReserveError(_) => "out of memory",
        B::NumericConversion(_) => "a size or count does not fit the squashfs format",
        B::InvalidFilePath | B::UndefineFileName | B::DuplicatedFileName => "invalid or duplicate path",
        B::UnsupportedCompression(_) | B::InvalidCompressionOption | B::CompressionInit(_) => "compressor unavailable",
        // backhand builds these lists of errors without `Debug` or `Display`
        // unless its `error-strings` feature is on; the remaining variants are
        // reader-side or internal.
        _ => "internal error",
    };
    Error::Backhand { path: image.to_path_buf(), reason }
}
