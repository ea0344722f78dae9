//! The partition's file tree as the bundler plans it: directories, and files
//! described as a list of segments (inline bytes, zeros, or whole blobs from
//! the cache) rather than as bytes on disk.
//!
//! Filesystem writers take a [`Tree`] and stream every file from its segments,
//! so no staging copy of the tarballs is ever written. Because a blob segment
//! names its digest, a writer can recognise identical data without hashing it
//! again (the erofs writer stores each shared 4 KiB chunk once).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use crate::digest::Digest;

/// One piece of a planned file, in order.
#[derive(Clone, Debug)]
pub enum Segment {
    /// Bytes produced by the bundler itself (tar headers, `index.json`, …).
    Inline(Arc<[u8]>),
    /// `len` zero bytes (tar padding, end-of-archive blocks).
    Zeros(u64),
    /// A whole verified blob, read from `path` (its file in the blob cache).
    Blob {
        /// Digest of the blob; equal digests mean equal bytes.
        digest: Digest,
        /// Size in bytes.
        size: u64,
        /// Where the blob's bytes are.
        path: PathBuf,
    },
}

impl Segment {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Segment::Inline(b) => b.len() as u64,
            Segment::Zeros(n) => *n,
            Segment::Blob { size, .. } => *size,
        }
    }

    /// True for a zero-length segment.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A regular file of the partition, as a concatenation of segments.
#[derive(Clone, Debug, Default)]
pub struct PlannedFile {
    /// The segments, in file order.
    pub segments: Vec<Segment>,
}

impl PlannedFile {
    /// A file holding exactly these bytes.
    pub fn from_bytes(bytes: impl Into<Arc<[u8]>>) -> Self {
        PlannedFile { segments: vec![Segment::Inline(bytes.into())] }
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.segments.iter().map(Segment::len).sum()
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends a segment, merging adjacent inline/zero pieces is left to
    /// readers: segments are kept as planned so offsets stay easy to reason about.
    pub fn push(&mut self, segment: Segment) {
        if !segment.is_empty() {
            self.segments.push(segment);
        }
    }

    /// A reader over the file's bytes, opening blob files lazily.
    pub fn reader(&self) -> PlannedReader<'_> {
        PlannedReader { file: self, index: 0, offset: 0, open: None }
    }
}

/// Streams a [`PlannedFile`]; blob files are opened one at a time.
pub struct PlannedReader<'a> {
    file: &'a PlannedFile,
    index: usize,
    /// Offset inside the current segment.
    offset: u64,
    open: Option<File>,
}

impl Read for PlannedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(segment) = self.file.segments.get(self.index) else { return Ok(0) };
            let remaining = segment.len() - self.offset;
            if remaining == 0 || buf.is_empty() {
                if buf.is_empty() {
                    return Ok(0);
                }
                self.index += 1;
                self.offset = 0;
                self.open = None;
                continue;
            }
            let want = buf.len().min(usize::try_from(remaining).unwrap_or(usize::MAX));
            let n = match segment {
                Segment::Inline(bytes) => {
                    let start = self.offset as usize;
                    buf[..want].copy_from_slice(&bytes[start..start + want]);
                    want
                }
                Segment::Zeros(_) => {
                    buf[..want].fill(0);
                    want
                }
                Segment::Blob { path, .. } => {
                    if self.open.is_none() {
                        let mut f = File::open(path)?;
                        f.seek(SeekFrom::Start(self.offset))?;
                        self.open = Some(f);
                    }
                    let f = self.open.as_mut().expect("opened above");
                    let n = f.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("blob {} is shorter than planned", path.display()),
                        ));
                    }
                    n
                }
            };
            self.offset += n as u64;
            return Ok(n);
        }
    }
}

/// A node of the tree.
#[derive(Clone, Debug)]
pub enum Node {
    /// A directory.
    Dir(Tree),
    /// A regular file.
    File(PlannedFile),
}

/// A directory: entries sorted by name (a `BTreeMap`), so every writer walks
/// the tree in the same order and output is deterministic.
#[derive(Clone, Debug, Default)]
pub struct Tree {
    /// Entries by name (one path component, no `/`).
    pub entries: BTreeMap<String, Node>,
}

impl Tree {
    /// Inserts a file at a `/`-separated relative path, creating directories.
    pub fn insert_file(&mut self, path: &str, file: PlannedFile) {
        let mut parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let name = parts.pop().expect("non-empty path").to_string();
        let mut dir = self;
        for part in parts {
            let node = dir.entries.entry(part.to_string()).or_insert_with(|| Node::Dir(Tree::default()));
            dir = match node {
                Node::Dir(t) => t,
                Node::File(_) => panic!("{path}: {part} is a file"),
            };
        }
        dir.entries.insert(name, Node::File(file));
    }

    /// Inserts an empty directory (and its parents).
    pub fn insert_dir(&mut self, path: &str) {
        let mut dir = self;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let node = dir.entries.entry(part.to_string()).or_insert_with(|| Node::Dir(Tree::default()));
            dir = match node {
                Node::Dir(t) => t,
                Node::File(_) => panic!("{path}: {part} is a file"),
            };
        }
    }

    /// Adds `.content/blobs/sha256/<hex>` ([`crate::partition::index::CONTENT_DIR`])
    /// for every blob segment of every file: a file of that one blob. The
    /// erofs writer stores its whole chunks as the blocks the tarballs
    /// already use (chunks are matched by digest), so only its block map
    /// and its last partial block are new.
    pub fn insert_content_store(&mut self) {
        let mut blobs: BTreeMap<String, Segment> = BTreeMap::new();
        for (_, file) in self.files() {
            for segment in &file.segments {
                if let Segment::Blob { digest, .. } = segment {
                    blobs.entry(digest.hex().to_string()).or_insert_with(|| segment.clone());
                }
            }
        }
        for (hex, segment) in blobs {
            let path = format!("{}/blobs/sha256/{hex}", crate::partition::index::CONTENT_DIR);
            self.insert_file(&path, PlannedFile { segments: vec![segment] });
        }
    }

    /// Every file with its `/`-separated path, depth-first in name order.
    pub fn files(&self) -> Vec<(String, &PlannedFile)> {
        let mut out = Vec::new();
        self.walk("", &mut out);
        out
    }

    fn walk<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a PlannedFile)>) {
        for (name, node) in &self.entries {
            let path = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
            match node {
                Node::Dir(t) => t.walk(&path, out),
                Node::File(f) => out.push((path, f)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_concatenates_segments() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("b");
        std::fs::write(&blob, b"blobdata").unwrap();
        let mut f = PlannedFile::from_bytes(&b"head"[..]);
        f.push(Segment::Zeros(3));
        f.push(Segment::Blob { digest: Digest::of(b"blobdata"), size: 8, path: blob });
        f.push(Segment::Inline(Arc::from(&b"tail"[..])));
        let mut out = Vec::new();
        f.reader().read_to_end(&mut out).unwrap();
        assert_eq!(out, b"head\0\0\0blobdatatail");
        assert_eq!(f.len(), out.len() as u64);
    }
}
