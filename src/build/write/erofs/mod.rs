//! Native erofs writer: the bundle [`Tree`] as an uncompressed erofs image
//! (4 KiB blocks) in which every shared 4 KiB chunk is stored once.
//!
//! Regular files use the chunk-based layout (kernel 5.15+): after the inode
//! comes a block map with one 4-byte block address per 4 KiB chunk, so chunks
//! of different files may point at the same block. Chunks are recognised as
//! identical by what the bundler planned, not by reading them: a blob that
//! starts on a 4096-aligned file offset (every blob in a planned tarball)
//! has its whole chunks placed once, at consecutive blocks found from its
//! digest alone; any other chunk (tar headers with a blob's tail, a blob's
//! unaligned copy) is keyed by its blob range or a hash of its piece list,
//! where inline bytes are hashed and blob pieces are named by digest and
//! range. All-zero chunks become holes. Blob data is never re-hashed.
//!
//! The chunk walk (`Assigner`) is deterministic, so instead of keeping
//! block maps it runs three times over the same files: to count blocks and
//! hash the chunk keys, to stream the metadata area (inodes, block maps), and
//! to stream the data blocks in ascending order straight from the blob cache
//! (`copy_file_range` where the kernel allows). Memory is one entry per blob
//! and per chunk that straddles a tar header, never per 4 KiB of data, and
//! never file contents.
//!
//! Output is deterministic: inodes in depth-first name order, build time 0,
//! a UUID derived from the metadata and the chunk keys. The image is written
//! to a temp file next to `out` and renamed into place when complete.
//!
//! [`Staged`] starts that temp file before the blobs exist: blocks are
//! assigned from the plan alone, so each blob's whole chunks can be copied
//! to their blocks as soon as the blob is in the cache (while other
//! downloads go on); the final write skips the blocks already there.

mod format;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use self::format::{
    chunk_format, i_format, superblock_checksum, DataLayout, Dirent, InodeCompact, InodeExtended, SuperBlock, BLOCK,
    BLOCK_BITS, FEATURE_COMPAT_SB_CHKSUM, FEATURE_INCOMPAT_CHUNKED_FILE, FT_DIR, FT_REG_FILE, NID_UNIT, NULL_ADDR,
    SUPER_MAGIC, SUPER_OFFSET,
};
use crate::build::layout::tree::{Node, PlannedFile, Segment, Tree};
use crate::digest::Digest;
use crate::partition::release::{Piece, PlanBlob};

/// Statistics of a written image.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Bytes of the image file.
    pub image_bytes: u64,
    /// Inodes (directories and files).
    pub inodes: u64,
    /// Sum of the sizes of all regular files.
    pub file_bytes: u64,
    /// Bytes of the metadata area (superblock, inodes, inline data, block maps).
    pub metadata_bytes: u64,
    /// File data blocks written (each distinct non-zero chunk once).
    pub data_blocks: u64,
    /// Chunks that point at a block another chunk already wrote.
    pub chunks_deduplicated: u64,
    /// All-zero chunks stored as holes.
    pub hole_chunks: u64,
    /// Every blob whose bytes the image holds whole (in its own blocks), in
    /// the order of its first byte in the image: what a release plan lists.
    pub blobs: Vec<PlanBlob>,
    /// Those blobs' pieces, in image order.
    pub pieces: Vec<Piece>,
}

/// Errors of the erofs writer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A directory entry name erofs cannot store.
    #[error("invalid file name {name:?}: must be 1..=255 bytes without '/' or NUL, and not . or ..")]
    BadName {
        /// The name.
        name: String,
    },
    /// The image would exceed erofs' 32-bit block addresses (16 TiB).
    #[error("the image needs {blocks} blocks, more than erofs' 2^32 - 1")]
    TooLarge {
        /// Blocks needed.
        blocks: u64,
    },
    /// A blob in the cache is shorter than the plan says.
    #[error("{path}: blob is shorter than planned (wanted {wanted} bytes at offset {offset})")]
    ShortBlob {
        /// The blob's file.
        path: PathBuf,
        /// Offset of the read.
        offset: u64,
        /// Bytes wanted.
        wanted: u64,
    },
    /// I/O on the output or a blob.
    #[error("{path}: {source}")]
    Io {
        /// Path concerned.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Chunk size of chunk-based files: one block, the alignment of blob data
/// inside tarballs.
const CHUNK: u64 = BLOCK;
const S_IFDIR: u16 = 0o040000;
const S_IFREG: u16 = 0o100000;
const VOLUME_NAME: &[u8] = b"preseed";

/// Writes `tree` as an erofs image at `out`.
pub fn write(tree: &Tree, out: &Path) -> Result<Stats, Error> {
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new().prefix(".preseed-erofs-").tempfile_in(dir).map_err(io_err(dir))?;
    let stats = write_to(tree, tmp.as_file(), out)?;
    tmp.as_file().set_permissions(fs::Permissions::from_mode(0o644)).map_err(io_err(out))?;
    tmp.as_file().sync_all().map_err(io_err(out))?;
    tmp.persist(out).map_err(|e| Error::Io { path: out.to_path_buf(), source: e.error })?;
    Ok(stats)
}

/// Writes `tree` as an erofs image into the empty `file` (`name` is for
/// messages). [`write()`] uses it; so do benchmarks that write to `/dev/null`.
pub fn write_to(tree: &Tree, file: &File, name: &Path) -> Result<Stats, Error> {
    let mut plan = Plan::new(tree)?;
    plan.assign_data()?;
    plan.write_image(file, name, &HashMap::new())?;
    Ok(plan.stats)
}

/// Where one blob's whole chunks go: `count` blocks from `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Place {
    addr: u32,
    count: u64,
}

/// An erofs image written in two steps: blob data first, each blob as soon
/// as it is in the cache, then everything else once the final tree is known.
///
/// The provisional tree must have the final tree's files and blobs; inline
/// bytes may differ (`preseed.json` before the tarball sums are known). Any
/// blob the final tree places elsewhere, or that was never placed, is simply
/// written by [`Staged::finish`], so a provisional tree that turns out
/// different costs time, never correctness.
pub struct Staged {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
    /// Every aligned blob's block range in the provisional plan.
    places: HashMap<Digest, Place>,
    /// Blobs copied by [`Staged::place`].
    placed: std::sync::Mutex<HashMap<Digest, Place>>,
}

impl Staged {
    /// Plans `provisional` and creates the image's temp file next to `out`.
    pub fn new(provisional: &Tree, out: &Path) -> Result<Self, Error> {
        let dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let tmp = tempfile::Builder::new().prefix(".preseed-erofs-").tempfile_in(dir).map_err(io_err(dir))?;
        let mut plan = Plan::new(provisional)?;
        plan.assign_data()?;
        let places = plan.places.drain().collect();
        Ok(Staged { tmp, path: out.to_path_buf(), places, placed: Default::default() })
    }

    /// Copies the whole chunks of blob `digest` (at `path`, verified) to its
    /// blocks; a blob the plan has no aligned copy of is left to `finish`.
    /// Safe to call from several threads at once.
    pub fn place(&self, digest: &Digest, path: &Path) -> Result<(), Error> {
        let Some(&place) = self.places.get(digest) else { return Ok(()) };
        let len = place.count * CHUNK;
        let at = u64::from(place.addr) * BLOCK;
        // Its own open file, so its own offset: blobs are placed from
        // several threads at once. `io::copy` between files is
        // `copy_file_range` where the kernel allows, as in `Sink::copy_blob`.
        let mut src = File::open(path).map_err(io_err(path))?.take(len);
        let mut dst = fs::OpenOptions::new().write(true).open(self.tmp.path()).map_err(io_err(&self.path))?;
        dst.seek(SeekFrom::Start(at)).map_err(io_err(&self.path))?;
        let copied = io::copy(&mut src, &mut dst).map_err(io_err(&self.path))?;
        if copied != len {
            return Err(Error::ShortBlob { path: path.to_path_buf(), offset: copied, wanted: len - copied });
        }
        // Start writeback now, so the final fsync finds little left to do.
        // SAFETY: plain syscall on an open descriptor; no memory is passed.
        unsafe {
            libc::sync_file_range(self.tmp.as_file().as_raw_fd(), at as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
        }
        self.placed.lock().unwrap_or_else(|e| e.into_inner()).insert(digest.clone(), place);
        Ok(())
    }

    /// Writes the rest of `tree` (the final tree) and renames the image to
    /// `out`.
    pub fn finish(self, tree: &Tree) -> Result<Stats, Error> {
        let placed = self.placed.into_inner().unwrap_or_else(|e| e.into_inner());
        let out = self.path;
        let mut plan = Plan::new(tree)?;
        plan.assign_data()?;
        plan.write_image(self.tmp.as_file(), &out, &placed)?;
        let file = self.tmp.as_file();
        // Placed blocks past the last written one already set the length.
        file.set_len(plan.blocks * BLOCK).map_err(io_err(&out))?;
        file.set_permissions(fs::Permissions::from_mode(0o644)).map_err(io_err(&out))?;
        file.sync_all().map_err(io_err(&out))?;
        self.tmp.persist(&out).map_err(|e| Error::Io { path: out.clone(), source: e.error })?;
        Ok(plan.stats)
    }
}

/// One directory entry, `.` and `..` included.
struct Entry {
    name: Vec<u8>,
    inode: usize,
    file_type: u8,
}

enum Body<'a> {
    /// Entries sorted by name bytes (what the kernel's binary search expects).
    Dir(Vec<Entry>),
    File(&'a PlannedFile),
}

/// Where an inode's data lives.
enum Layout {
    /// `blocks` contiguous blocks from `blkaddr` (an empty file has none).
    Plain { blkaddr: u32, blocks: u64 },
    /// `full` blocks from `blkaddr`, then `tail` bytes right after the inode.
    Inline { blkaddr: u32, full: u64, tail: u64 },
    /// One block address (or hole) per chunk, stored after the inode; the
    /// addresses come from the [`Assigner`] walk, not from memory.
    Chunked,
}

struct Inode<'a> {
    body: Body<'a>,
    size: u64,
    nlink: u32,
    extended: bool,
    layout: Layout,
    /// Byte offset of the inode in the image (`meta_blkaddr` is 0).
    offset: u64,
}

impl Inode<'_> {
    fn nid(&self) -> u64 {
        self.offset / NID_UNIT
    }

    fn inode_size(&self) -> u64 {
        if self.extended {
            InodeExtended::SIZE as u64
        } else {
            InodeCompact::SIZE as u64
        }
    }
}

/// What makes a chunk's content: equal keys mean equal bytes. Whole chunks of
/// aligned blobs have no key of their own (see [`Assigner`]).
#[derive(Clone, PartialEq, Eq, Hash)]
enum ChunkKey {
    /// `len` bytes at `offset` of one blob (interned digest number).
    Blob { blob: u32, offset: u64, len: u64 },
    /// sha256 of the chunk's piece list (see [`piece_list_hash`]).
    Mixed([u8; 32]),
}

struct Plan<'a> {
    inodes: Vec<Inode<'a>>,
    /// First block after the metadata area.
    data_start: u64,
    /// Total blocks of the image.
    blocks: u64,
    /// Hash of every chunk key in order, for the UUID.
    content: Sha256,
    /// Where each aligned blob's whole chunks went (filled by `assign_data`).
    places: HashMap<Digest, Place>,
    stats: Stats,
}

impl<'a> Plan<'a> {
    /// First pass, part one: inodes in depth-first name order, and their
    /// places in the metadata area.
    fn new(tree: &'a Tree) -> Result<Self, Error> {
        let mut inodes = Vec::new();
        collect(tree, 0, &mut inodes)?;
        let mut cursor = SUPER_OFFSET + SuperBlock::SIZE as u64;
        for inode in &mut inodes {
            let isize = inode.inode_size();
            if cursor % BLOCK + isize > BLOCK {
                cursor = cursor.next_multiple_of(BLOCK);
            }
            let inline_tail = match inode.body {
                Body::Dir(_) => true,
                Body::File(_) => inode.size < BLOCK,
            };
            let tail = inode.size % BLOCK;
            let full = inode.size / BLOCK;
            let room = BLOCK - cursor % BLOCK;
            let extra;
            inode.layout = if inode.size == 0 {
                extra = 0;
                Layout::Plain { blkaddr: 0, blocks: 0 }
            } else if inline_tail && tail != 0 && isize + tail <= room {
                extra = tail;
                Layout::Inline { blkaddr: 0, full, tail }
            } else if inline_tail && tail != 0 && isize + tail <= BLOCK && room < BLOCK - tail {
                // Padding to a fresh metadata block wastes less than a data
                // block holding only the tail.
                cursor = cursor.next_multiple_of(BLOCK);
                extra = tail;
                Layout::Inline { blkaddr: 0, full, tail }
            } else if let Body::File(_) = inode.body {
                extra = inode.size.div_ceil(CHUNK) * 4;
                Layout::Chunked
            } else {
                extra = 0;
                Layout::Plain { blkaddr: 0, blocks: inode.size.div_ceil(BLOCK) }
            };
            inode.offset = cursor;
            cursor = (cursor + isize + extra).next_multiple_of(NID_UNIT);
        }
        debug_assert!(inodes[0].nid() <= u64::from(u16::MAX), "root comes first");
        let data_start = cursor.div_ceil(BLOCK);
        let stats = Stats {
            inodes: inodes.len() as u64,
            metadata_bytes: data_start * BLOCK,
            file_bytes: inodes.iter().filter(|i| matches!(i.body, Body::File(_))).map(|i| i.size).sum(),
            ..Stats::default()
        };
        Ok(Plan { inodes, data_start, blocks: data_start, content: Sha256::new(), places: HashMap::new(), stats })
    }

    /// First pass, part two: data blocks for directories (kept) and distinct
    /// chunks (counted and hashed for the UUID), in inode order, the order
    /// the second pass writes them.
    fn assign_data(&mut self) -> Result<(), Error> {
        let mut at = Assigner::new(self.data_start);
        let (content, stats, places) = (&mut self.content, &mut self.stats, &mut self.places);
        // (blob number, offset in blob, image offset, length) of every
        // block written with one blob's bytes only.
        let mut found: Vec<(u32, u64, u64, u64)> = Vec::new();
        for inode in &mut self.inodes {
            match (&mut inode.layout, &inode.body) {
                (Layout::Plain { blkaddr, blocks }, _) if *blocks > 0 => *blkaddr = at.reserve(*blocks)?,
                (Layout::Inline { blkaddr, full, .. }, _) if *full > 0 => *blkaddr = at.reserve(*full)?,
                (Layout::Chunked, Body::File(file)) => at.file(file, |_, chunk| {
                    match chunk {
                        Chunk::Run { digest, number, count, addr, new, .. } => {
                            if new {
                                places.insert(digest.clone(), Place { addr, count });
                                found.push((number, 0, u64::from(addr) * BLOCK, count * CHUNK));
                            }
                            for k in 0..count {
                                content.update(b"B");
                                content.update(number.to_le_bytes());
                                content.update((k * CHUNK).to_le_bytes());
                                content.update(CHUNK.to_le_bytes());
                            }
                            if new {
                                stats.data_blocks += count;
                            } else {
                                stats.chunks_deduplicated += count;
                            }
                        }
                        Chunk::One { key: None, .. } => {
                            content.update(b"H");
                            stats.hole_chunks += 1;
                        }
                        Chunk::One { key: Some(key), new, addr, .. } => {
                            match key {
                                ChunkKey::Blob { blob, offset, len } => {
                                    if new {
                                        found.push((blob, offset, u64::from(addr) * BLOCK, len));
                                    }
                                    content.update(b"B");
                                    content.update(blob.to_le_bytes());
                                    content.update(offset.to_le_bytes());
                                    content.update(len.to_le_bytes());
                                }
                                ChunkKey::Mixed(hash) => {
                                    content.update(b"M");
                                    content.update(hash);
                                }
                            }
                            if new {
                                stats.data_blocks += 1;
                            } else {
                                stats.chunks_deduplicated += 1;
                            }
                        }
                    }
                    Ok(())
                })?,
                _ => {}
            }
        }
        // Blob numbers are interned in first-use order, so they are stable;
        // name the blobs themselves in the content hash too.
        let mut named: Vec<(u32, &Digest)> = at.blobs.iter().map(|(d, p)| (p.number, *d)).collect();
        named.sort();
        for (_, digest) in &named {
            self.content.update(digest.hex().as_bytes());
        }
        let sizes: HashMap<&Digest, u64> = self
            .inodes
            .iter()
            .filter_map(|i| match i.body {
                Body::File(f) => Some(f.segments.iter()),
                Body::Dir(_) => None,
            })
            .flatten()
            .filter_map(|s| match s {
                Segment::Blob { digest, size, .. } => Some((digest, *size)),
                _ => None,
            })
            .collect();
        (self.stats.blobs, self.stats.pieces) = whole_blobs(found, &named, &sizes);
        self.blocks = at.next;
        block_addr(at.next)?;
        Ok(())
    }

    /// Second pass, part one: the metadata area (superblock, inodes, inline
    /// tails, block maps), streamed. The UUID hashes the area with the
    /// superblock still zero, so block 0 is kept aside and written last.
    fn write_metadata(&self, sink: &mut Sink<'_, '_>, file: &File) -> Result<(), Error> {
        let mut meta = MetaSink { sink, hash: self.content.clone(), first: vec![0u8; BLOCK as usize] };
        let mut at = Assigner::new(self.data_start);
        for (ino, inode) in self.inodes.iter().enumerate() {
            let (layout, i_u) = match &inode.layout {
                Layout::Plain { blkaddr, .. } => (DataLayout::FlatPlain, *blkaddr),
                Layout::Inline { blkaddr, .. } => (DataLayout::FlatInline, *blkaddr),
                Layout::Chunked => (DataLayout::ChunkBased, u32::from(chunk_format(0))),
            };
            let mode = match inode.body {
                Body::Dir(_) => S_IFDIR | 0o755,
                Body::File(_) => S_IFREG | 0o644,
            };
            meta.pad_to(inode.offset)?;
            if inode.extended {
                let raw = InodeExtended {
                    i_format: i_format(true, layout),
                    i_mode: mode,
                    i_size: inode.size,
                    i_u,
                    i_ino: ino as u32 + 1,
                    i_nlink: inode.nlink,
                    ..Default::default()
                }
                .encode();
                meta.write(&raw)?;
            } else {
                let raw = InodeCompact {
                    i_format: i_format(false, layout),
                    i_mode: mode,
                    i_nlink: inode.nlink as u16,
                    i_size: inode.size as u32,
                    i_u,
                    i_ino: ino as u32 + 1,
                    ..Default::default()
                }
                .encode();
                meta.write(&raw)?;
            }
            match (&inode.layout, &inode.body) {
                (Layout::Plain { blocks, .. }, _) if *blocks > 0 => {
                    at.reserve(*blocks)?;
                }
                (Layout::Inline { full, tail, .. }, _) => {
                    if *full > 0 {
                        at.reserve(*full)?;
                    }
                    meta.write(&self.data_of(inode, *full * BLOCK, *tail)?)?;
                }
                (Layout::Chunked, Body::File(file)) => at.file(file, |_, chunk| match chunk {
                    Chunk::Run { addr, count, .. } => {
                        for k in 0..count as u32 {
                            meta.write(&(addr + k).to_le_bytes())?;
                        }
                        Ok(())
                    }
                    Chunk::One { addr, .. } => meta.write(&addr.to_le_bytes()),
                })?,
                _ => {}
            }
        }
        meta.pad_to(self.data_start * BLOCK)?;
        debug_assert_eq!(at.next, self.blocks, "same walk, same blocks");
        let MetaSink { sink, hash, mut first } = meta;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&hash.finalize()[..16]);
        // RFC 9562 version 8 (custom), variant 0b10.
        uuid[6] = (uuid[6] & 0x0F) | 0x80;
        uuid[8] = (uuid[8] & 0x3F) | 0x80;
        let mut volume_name = [0u8; 16];
        volume_name[..VOLUME_NAME.len()].copy_from_slice(VOLUME_NAME);
        let chunked = self.inodes.iter().any(|i| matches!(i.layout, Layout::Chunked));
        let sb = SuperBlock {
            magic: SUPER_MAGIC,
            feature_compat: FEATURE_COMPAT_SB_CHKSUM,
            blkszbits: BLOCK_BITS,
            root_nid: self.inodes[0].nid() as u16,
            inos: self.inodes.len() as u64,
            blocks: self.blocks as u32,
            uuid,
            volume_name,
            feature_incompat: if chunked { FEATURE_INCOMPAT_CHUNKED_FILE } else { 0 },
            ..Default::default()
        }
        .encode();
        first[SUPER_OFFSET as usize..SUPER_OFFSET as usize + sb.len()].copy_from_slice(&sb);
        // Last: the checksum covers the rest of block 0 (the first inodes).
        let checksum = superblock_checksum(&first);
        first[SUPER_OFFSET as usize + 4..SUPER_OFFSET as usize + 8].copy_from_slice(&checksum.to_le_bytes());
        // Block 0 went out as zeros for the superblock; overwrite it in place
        // once the buffer has reached the file.
        sink.w.flush().map_err(io_err(sink.path))?;
        file.write_all_at(&first, 0).map_err(io_err(sink.path))?;
        Ok(())
    }

    /// `len` bytes at `offset` of a directory or small (inlined) file.
    fn data_of(&self, inode: &Inode<'_>, offset: u64, len: u64) -> Result<Vec<u8>, Error> {
        let range = offset as usize..(offset + len) as usize;
        Ok(match &inode.body {
            Body::Dir(entries) => dir_bytes(entries, &self.inodes)[range].to_vec(),
            Body::File(file) => {
                // Only files under one block are inlined: cheap to read whole.
                let mut bytes = Vec::with_capacity(inode.size as usize);
                file.reader()
                    .take(inode.size)
                    .read_to_end(&mut bytes)
                    .map_err(|e| Error::Io { path: PathBuf::from("<small file>"), source: e })?;
                if (bytes.len() as u64) < inode.size {
                    return Err(Error::ShortBlob {
                        path: PathBuf::from("<small file>"),
                        offset: 0,
                        wanted: inode.size,
                    });
                }
                bytes[range].to_vec()
            }
        })
    }

    /// Second pass: metadata, then every data block in ascending order,
    /// except blob runs already `placed` at the very blocks this plan gives.
    fn write_image(&mut self, file: &File, out: &Path, placed: &HashMap<Digest, Place>) -> Result<(), Error> {
        let mut sink = Sink { w: BufWriter::with_capacity(1 << 20, file), pos: 0, path: out };
        self.write_metadata(&mut sink, file)?;
        let mut at = Assigner::new(self.data_start);
        let mut block = vec![0u8; CHUNK as usize];
        for inode in &self.inodes {
            match (&inode.layout, &inode.body) {
                (Layout::Plain { blkaddr, blocks }, Body::Dir(entries)) if *blocks > 0 => {
                    at.reserve(*blocks)?;
                    sink.expect_block(*blkaddr);
                    sink.write(&dir_bytes(entries, &self.inodes))?;
                    sink.pad_to_block()?;
                }
                (Layout::Inline { blkaddr, full, .. }, Body::Dir(entries)) if *full > 0 => {
                    at.reserve(*full)?;
                    sink.expect_block(*blkaddr);
                    sink.write(&dir_bytes(entries, &self.inodes)[..(*full * BLOCK) as usize])?;
                }
                (Layout::Inline { full, .. }, Body::File(_)) => debug_assert_eq!(*full, 0),
                (Layout::Chunked, Body::File(file)) => {
                    at.file(file, |pieces, chunk| write_chunk(&mut sink, pieces, chunk, &mut block, placed))?
                }
                (Layout::Plain { blocks, .. }, Body::File(_)) => debug_assert_eq!(*blocks, 0),
                _ => {}
            }
        }
        sink.w.flush().map_err(io_err(out))?;
        assert_eq!(sink.pos, self.blocks * BLOCK, "every assigned block written exactly once");
        self.stats.image_bytes = sink.pos;
        Ok(())
    }
}

/// Where each chunk goes, decided in image order. Equal chunks get the block
/// of their first occurrence; a fresh walk over the same files gives the
/// same addresses, which is what lets the writer keep no block maps.
struct Assigner<'a> {
    /// Next unassigned block.
    next: u64,
    blobs: HashMap<&'a Digest, BlobPlace>,
    /// Chunks that are not whole chunks of an aligned blob.
    others: HashMap<ChunkKey, u32>,
}

struct BlobPlace {
    /// Interned in first-use order (named in [`ChunkKey::Blob`] and the UUID).
    number: u32,
    /// First block of the blob's whole chunks, once an aligned copy is placed.
    first: Option<u32>,
}

/// One step of the walk over a file's chunks.
enum Chunk<'a> {
    /// The `count` whole chunks of a blob that starts on a chunk boundary:
    /// blocks `addr..addr + count`, written by this copy if `new`.
    Run { digest: &'a Digest, path: &'a Path, number: u32, count: u64, addr: u32, new: bool },
    /// Chunk `start..end`: a hole (no key), or block `addr`.
    One { start: u64, end: u64, key: Option<ChunkKey>, addr: u32, new: bool },
}

impl<'a> Assigner<'a> {
    fn new(data_start: u64) -> Self {
        Assigner { next: data_start, blobs: HashMap::new(), others: HashMap::new() }
    }

    /// `blocks` fresh blocks (directories, inlined files' full blocks).
    fn reserve(&mut self, blocks: u64) -> Result<u32, Error> {
        let addr = block_addr(self.next)?;
        self.next += blocks;
        Ok(addr)
    }

    /// Walks `file` chunk by chunk (a whole aligned blob at once).
    fn file(
        &mut self,
        file: &'a PlannedFile,
        mut each: impl FnMut(&Pieces<'a>, Chunk<'a>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let pieces = Pieces::new(file);
        let size = file.len();
        let mut start = 0;
        while start < size {
            let i = pieces.ends.partition_point(|&e| e <= start);
            if let Some(Segment::Blob { digest, size: blob_size, path }) = pieces.segments.get(i) {
                let count = blob_size / CHUNK;
                if pieces.ends[i] - blob_size == start && count > 0 {
                    let number = intern(&mut self.blobs, digest).number;
                    let place = self.blobs.get_mut(digest).expect("interned");
                    let (addr, new) = match place.first {
                        Some(addr) => (addr, false),
                        None => {
                            let addr = block_addr(self.next)?;
                            self.next += count;
                            block_addr(self.next - 1)?;
                            place.first = Some(addr);
                            (addr, true)
                        }
                    };
                    each(&pieces, Chunk::Run { digest, path, number, count, addr, new })?;
                    start += count * CHUNK;
                    continue;
                }
            }
            let end = (start + CHUNK).min(size);
            let key = chunk_key(&pieces, start, end, &mut self.blobs);
            let (addr, new) = match &key {
                None => (NULL_ADDR, false),
                Some(key) => match self.others.get(key) {
                    Some(&addr) => (addr, false),
                    None => {
                        let addr = self.reserve(1)?;
                        self.others.insert(key.clone(), addr);
                        (addr, true)
                    }
                },
            };
            each(&pieces, Chunk::One { start, end, key, addr, new })?;
            start = end;
        }
        Ok(())
    }
}

/// The blobs whose pieces cover them whole, numbered in the order of their
/// first byte in the image, and those pieces in image order. A blob with a
/// gap (bytes only inside mixed blocks) is left out: its bytes stay in the
/// release's rest.
fn whole_blobs(
    mut found: Vec<(u32, u64, u64, u64)>,
    named: &[(u32, &Digest)],
    sizes: &HashMap<&Digest, u64>,
) -> (Vec<PlanBlob>, Vec<Piece>) {
    found.sort_by_key(|&(number, from, at, _)| (number, from, at));
    let mut chosen: Vec<(u32, u64, u64, u64)> = Vec::new();
    for group in found.chunk_by(|a, b| a.0 == b.0) {
        let number = group[0].0;
        let Some(size) = named.get(number as usize).and_then(|(_, d)| sizes.get(d)) else { continue };
        let mut covered = 0;
        let mut pieces = Vec::new();
        for &(n, from, at, len) in group {
            if from == covered {
                pieces.push((n, from, at, len));
                covered += len;
            }
        }
        if covered == *size {
            chosen.extend(pieces);
        }
    }
    chosen.sort_by_key(|&(_, _, at, _)| at);
    let mut index: HashMap<u32, u32> = HashMap::new();
    let mut blobs = Vec::new();
    let pieces = chosen
        .into_iter()
        .map(|(number, from, at, len)| {
            let blob = *index.entry(number).or_insert_with(|| {
                let digest = named[number as usize].1;
                blobs.push(PlanBlob { digest: digest.clone(), size: sizes[digest] });
                (blobs.len() - 1) as u32
            });
            Piece { blob, from, at, len }
        })
        .collect();
    (blobs, pieces)
}

/// The blob's place, interning it (next number) on first use.
fn intern<'a, 'm>(blobs: &'m mut HashMap<&'a Digest, BlobPlace>, digest: &'a Digest) -> &'m mut BlobPlace {
    let number = blobs.len() as u32;
    blobs.entry(digest).or_insert(BlobPlace { number, first: None })
}

fn block_addr(block: u64) -> Result<u32, Error> {
    u32::try_from(block).ok().filter(|&b| b != NULL_ADDR).ok_or(Error::TooLarge { blocks: block })
}

/// Pushes `tree` and everything below it, depth-first in name order; returns
/// the directory's inode number (index).
fn collect<'a>(tree: &'a Tree, parent: usize, inodes: &mut Vec<Inode<'a>>) -> Result<usize, Error> {
    let me = inodes.len();
    inodes.push(Inode {
        body: Body::Dir(Vec::new()),
        size: 0,
        nlink: 2,
        extended: false,
        layout: Layout::Plain { blkaddr: 0, blocks: 0 },
        offset: 0,
    });
    let parent = if me == 0 { me } else { parent };
    let mut entries = vec![
        Entry { name: b".".to_vec(), inode: me, file_type: FT_DIR },
        Entry { name: b"..".to_vec(), inode: parent, file_type: FT_DIR },
    ];
    let mut subdirs = 0u32;
    for (name, node) in &tree.entries {
        if name.is_empty() || name.len() > 255 || name.contains(['/', '\0']) || name == "." || name == ".." {
            return Err(Error::BadName { name: name.clone() });
        }
        let (inode, file_type) = match node {
            Node::Dir(sub) => {
                subdirs += 1;
                (collect(sub, me, inodes)?, FT_DIR)
            }
            Node::File(file) => {
                let size = file.len();
                inodes.push(Inode {
                    body: Body::File(file),
                    size,
                    nlink: 1,
                    extended: size > u64::from(u32::MAX),
                    layout: Layout::Plain { blkaddr: 0, blocks: 0 },
                    offset: 0,
                });
                (inodes.len() - 1, FT_REG_FILE)
            }
        };
        entries.push(Entry { name: name.as_bytes().to_vec(), inode, file_type });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let dir = &mut inodes[me];
    dir.size = dir_size(&entries);
    dir.nlink = 2 + subdirs;
    dir.extended = dir.nlink > u32::from(u16::MAX) || dir.size > u64::from(u32::MAX);
    dir.body = Body::Dir(entries);
    Ok(me)
}

/// Splits sorted entries into directory blocks: each block holds its dirents
/// then their names, and no name crosses a block.
fn dir_blocks(entries: &[Entry]) -> Vec<std::ops::Range<usize>> {
    let mut blocks = Vec::new();
    let (mut start, mut used) = (0, 0u64);
    for (i, e) in entries.iter().enumerate() {
        let need = Dirent::SIZE as u64 + e.name.len() as u64;
        if used + need > BLOCK {
            blocks.push(start..i);
            (start, used) = (i, 0);
        }
        used += need;
    }
    blocks.push(start..entries.len());
    blocks
}

fn dir_size(entries: &[Entry]) -> u64 {
    let blocks = dir_blocks(entries);
    let last = blocks.last().expect("at least . and ..");
    let last_used: u64 = entries[last.clone()].iter().map(|e| Dirent::SIZE as u64 + e.name.len() as u64).sum();
    (blocks.len() as u64 - 1) * BLOCK + last_used
}

/// The directory's bytes: full blocks zero-padded, the last one exact.
fn dir_bytes(entries: &[Entry], inodes: &[Inode<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for range in dir_blocks(entries) {
        out.resize(out.len().next_multiple_of(BLOCK as usize), 0);
        let block = &entries[range];
        let mut nameoff = block.len() * Dirent::SIZE;
        for e in block {
            let d = Dirent { nid: inodes[e.inode].nid(), nameoff: nameoff as u16, file_type: e.file_type, reserved: 0 };
            out.extend_from_slice(&d.encode());
            nameoff += e.name.len();
        }
        for e in block {
            out.extend_from_slice(&e.name);
        }
    }
    debug_assert_eq!(out.len() as u64, dir_size(entries));
    out
}

/// A planned file's segments with their end offsets, to find the pieces of
/// a byte range.
struct Pieces<'a> {
    segments: &'a [Segment],
    ends: Vec<u64>,
}

impl<'a> Pieces<'a> {
    fn new(file: &'a PlannedFile) -> Self {
        let mut end = 0;
        let ends = file.segments.iter().map(|s| {
            end += s.len();
            end
        });
        Pieces { segments: &file.segments, ends: ends.collect() }
    }

    /// `(segment index, offset inside it, length)` covering `start..end`.
    fn of(&self, start: u64, end: u64) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        let first = self.ends.partition_point(|&e| e <= start);
        (first..self.segments.len()).map_while(move |i| {
            let seg_start = self.ends[i] - self.segments[i].len();
            if seg_start >= end {
                return None;
            }
            let from = start.max(seg_start);
            let to = end.min(self.ends[i]);
            Some((i, from - seg_start, to - from))
        })
    }

    /// If `start..end` lies inside one blob: its segment index and offset.
    fn single_blob(&self, start: u64, end: u64) -> Option<(usize, u64)> {
        let i = self.ends.partition_point(|&e| e <= start);
        let seg = self.segments.get(i)?;
        let seg_start = self.ends[i] - seg.len();
        (matches!(seg, Segment::Blob { .. }) && self.ends[i] >= end).then_some((i, start - seg_start))
    }
}

/// The key of chunk `start..end`, or `None` if it is all zeros.
fn chunk_key<'a>(
    pieces: &Pieces<'a>,
    start: u64,
    end: u64,
    blobs: &mut HashMap<&'a Digest, BlobPlace>,
) -> Option<ChunkKey> {
    let mut zero = true;
    for (i, off, len) in pieces.of(start, end) {
        zero &= match &pieces.segments[i] {
            Segment::Zeros(_) => true,
            Segment::Inline(bytes) => bytes[off as usize..(off + len) as usize].iter().all(|&b| b == 0),
            Segment::Blob { .. } => false,
        };
    }
    if zero {
        return None;
    }
    if let Some((i, offset)) = pieces.single_blob(start, end) {
        let Segment::Blob { digest, .. } = &pieces.segments[i] else { unreachable!("single_blob checks") };
        let blob = intern(blobs, digest).number;
        return Some(ChunkKey::Blob { blob, offset, len: end - start });
    }
    Some(ChunkKey::Mixed(piece_list_hash(pieces, start, end)))
}

/// sha256 of a canonical description of the chunk's pieces: inline bytes
/// verbatim, zeros by length, blob ranges by digest, offset and length.
/// Equal descriptions mean equal bytes; only inline bytes are hashed.
fn piece_list_hash(pieces: &Pieces<'_>, start: u64, end: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    for (i, off, len) in pieces.of(start, end) {
        match &pieces.segments[i] {
            Segment::Inline(bytes) => {
                h.update(b"I");
                h.update(len.to_le_bytes());
                h.update(&bytes[off as usize..(off + len) as usize]);
            }
            Segment::Zeros(_) => {
                h.update(b"Z");
                h.update(len.to_le_bytes());
            }
            Segment::Blob { digest, .. } => {
                h.update(b"B");
                h.update(digest.hex().as_bytes());
                h.update(off.to_le_bytes());
                h.update(len.to_le_bytes());
            }
        }
    }
    h.finalize().into()
}

/// Writes a chunk (or run) that owns its block, i.e. its first occurrence;
/// the rest are already written.
fn write_chunk(
    sink: &mut Sink<'_, '_>,
    pieces: &Pieces<'_>,
    chunk: Chunk<'_>,
    block: &mut [u8],
    placed: &HashMap<Digest, Place>,
) -> Result<(), Error> {
    match chunk {
        Chunk::Run { digest, path, count, addr, new: true, .. } => {
            sink.expect_block(addr);
            if placed.get(digest) == Some(&Place { addr, count }) {
                return sink.skip(count * CHUNK);
            }
            sink.copy_blob(path, 0, count * CHUNK)
        }
        Chunk::One { start, end, key: Some(_), addr, new: true } => {
            sink.expect_block(addr);
            block.fill(0);
            let mut at = 0usize;
            for (s, off, len) in pieces.of(start, end) {
                let dst = &mut block[at..at + len as usize];
                match &pieces.segments[s] {
                    Segment::Inline(bytes) => dst.copy_from_slice(&bytes[off as usize..(off + len) as usize]),
                    Segment::Zeros(_) => {}
                    Segment::Blob { path, .. } => {
                        let f = File::open(path).map_err(io_err(path))?;
                        f.read_exact_at(dst, off).map_err(|e| match e.kind() {
                            io::ErrorKind::UnexpectedEof => {
                                Error::ShortBlob { path: path.clone(), offset: off, wanted: len }
                            }
                            _ => Error::Io { path: path.clone(), source: e },
                        })?;
                    }
                }
                at += len as usize;
            }
            sink.write(block)
        }
        _ => Ok(()),
    }
}

/// The metadata area on its way out: hashed for the UUID, block 0 kept aside
/// for the superblock.
struct MetaSink<'s, 'f, 'p> {
    sink: &'s mut Sink<'f, 'p>,
    hash: Sha256,
    first: Vec<u8>,
}

impl MetaSink<'_, '_, '_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let pos = self.sink.pos as usize;
        if pos < self.first.len() {
            let n = bytes.len().min(self.first.len() - pos);
            self.first[pos..pos + n].copy_from_slice(&bytes[..n]);
        }
        self.hash.update(bytes);
        self.sink.write(bytes)
    }

    /// Zeros up to byte `offset` of the image.
    fn pad_to(&mut self, offset: u64) -> Result<(), Error> {
        debug_assert!(offset >= self.sink.pos, "metadata written in offset order");
        const ZEROS: [u8; BLOCK as usize] = [0; BLOCK as usize];
        while self.sink.pos < offset {
            let n = (offset - self.sink.pos).min(BLOCK) as usize;
            self.write(&ZEROS[..n])?;
        }
        Ok(())
    }
}

/// The image file, written strictly front to back.
struct Sink<'f, 'p> {
    w: BufWriter<&'f File>,
    pos: u64,
    path: &'p Path,
}

impl Sink<'_, '_> {
    fn block(&self) -> u64 {
        debug_assert_eq!(self.pos % BLOCK, 0);
        self.pos / BLOCK
    }

    fn expect_block(&self, blkaddr: u32) {
        debug_assert_eq!(self.block(), u64::from(blkaddr), "data written in assignment order");
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.w.write_all(bytes).map_err(io_err(self.path))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn pad_to_block(&mut self) -> Result<(), Error> {
        let pad = self.pos.next_multiple_of(BLOCK) - self.pos;
        self.write(&vec![0u8; pad as usize])
    }

    /// Moves past `len` bytes already in the file.
    fn skip(&mut self, len: u64) -> Result<(), Error> {
        self.w.seek(SeekFrom::Current(len as i64)).map_err(io_err(self.path))?;
        self.pos += len;
        Ok(())
    }

    /// Copies `len` bytes at `offset` of a blob file (in-kernel where possible).
    fn copy_blob(&mut self, path: &Path, offset: u64, len: u64) -> Result<(), Error> {
        let mut f = File::open(path).map_err(io_err(path))?;
        f.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
        let copied = io::copy(&mut f.take(len), &mut self.w).map_err(io_err(path))?;
        if copied != len {
            return Err(Error::ShortBlob { path: path.to_path_buf(), offset, wanted: len });
        }
        self.pos += len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(entries: &[&str]) -> Vec<Entry> {
        let mut v: Vec<Entry> =
            entries.iter().map(|n| Entry { name: n.as_bytes().to_vec(), inode: 0, file_type: FT_REG_FILE }).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    #[test]
    fn empty_dir_is_dot_and_dotdot() {
        assert_eq!(dir_size(&names(&[".", ".."])), 2 * 12 + 3);
    }

    #[test]
    fn directory_blocks_never_split_a_name() {
        let many: Vec<String> = (0..400).map(|i| format!("file-{i:04}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let entries = names(&refs);
        let blocks = dir_blocks(&entries);
        assert!(blocks.len() > 1);
        for b in &blocks {
            let used: usize = entries[b.clone()].iter().map(|e| 12 + e.name.len()).sum();
            assert!(used <= BLOCK as usize);
        }
    }

    #[test]
    fn names_erofs_cannot_store_are_rejected() {
        for bad in ["", "a/b", "nul\0", ".", "..", &"x".repeat(256)] {
            let mut tree = Tree::default();
            tree.entries.insert(bad.to_string(), Node::File(PlannedFile::default()));
            let err = Plan::new(&tree).err().expect("rejected");
            assert!(matches!(err, Error::BadName { .. }), "{bad:?}: {err}");
        }
    }

    #[test]
    fn pieces_cover_ranges_across_segments() {
        let mut f = PlannedFile::from_bytes(vec![1u8; 100]);
        f.push(Segment::Zeros(5000));
        let p = Pieces::new(&f);
        let got: Vec<_> = p.of(50, 4146).collect();
        assert_eq!(got, vec![(0, 50, 50), (1, 0, 4046)]);
        assert!(p.single_blob(0, 4096).is_none());
    }
}
