//! Random access to a tar archive: the loader finds each entry by reading tar
//! headers and seeking past the data, never by streaming the whole file, then
//! reads small files (index.json, manifests) and hands out blob locations.
//!
//! Compressed archives (gzip, zstd: k3s-style preload files) cannot be
//! seeked; they are decompressed once into an unlinked temp file first.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::digest::Digest;

const BLOCK: u64 = 512;
/// Largest PAX or GNU long-name record the loader accepts.
const MAX_META: u64 = 1 << 20;

/// Why an archive could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Reading the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The archive.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A header block is not a valid tar header.
    #[error("{path}: not a tar archive (bad header at offset {offset})")]
    NotTar {
        /// The archive.
        path: PathBuf,
        /// Offset of the bad header.
        offset: u64,
    },
    /// An entry runs past the end of the file.
    #[error("{path}: truncated: entry {entry:?} ends at {end}, file has {len} bytes")]
    Truncated {
        /// The archive.
        path: PathBuf,
        /// The entry.
        entry: String,
        /// Where its data ends.
        end: u64,
        /// File length.
        len: u64,
    },
    /// A PAX header is malformed.
    #[error("{path}: bad PAX header at offset {offset}: {why}")]
    BadPax {
        /// The archive.
        path: PathBuf,
        /// Offset of the PAX header.
        offset: u64,
        /// What is wrong.
        why: PaxProblem,
    },
    /// A file the caller asked for is not in the archive.
    #[error("{path}: no {entry:?} in the archive")]
    Missing {
        /// The archive.
        path: PathBuf,
        /// The entry.
        entry: String,
    },
    /// A file is too large to be read into memory.
    #[error("{path}: {entry:?} is {size} bytes, more than the {limit} bytes expected of it")]
    TooLarge {
        /// The archive.
        path: PathBuf,
        /// The entry.
        entry: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
}

/// What is wrong with a PAX extended header (or a GNU long name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaxProblem {
    /// A record does not start with its length.
    #[error("record without length")]
    NoLength,
    /// The length is not a number.
    #[error("bad record length")]
    BadLength,
    /// The length runs past the header's data, or the record does not end in a newline.
    #[error("record length {0} does not fit")]
    LengthDoesNotFit(usize),
    /// No `key=value`.
    #[error("record without '='")]
    NoEquals,
    /// A `size` record that is not a number.
    #[error("size={0:?}")]
    BadSize(String),
    /// The header's data is larger than any header preseed accepts, or runs past the file.
    #[error("{0}-byte record")]
    TooLarge(u64),
}

/// Where one regular file's data lies inside the archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Offset of the first data byte.
    pub offset: u64,
    /// Data length.
    pub size: u64,
}

/// An opened archive with its table of regular files.
#[derive(Clone)]
pub struct Archive {
    path: PathBuf,
    file: Arc<File>,
    entries: BTreeMap<String, Entry>,
    decompressed: bool,
}

/// Compression of an archive file, told by magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// Recognises gzip and zstd magic; anything else is taken as plain tar.
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

impl Archive {
    /// Opens `path`, decompressing it into a temp file first if it is gzip or
    /// zstd, and indexes its entries.
    pub fn open(path: &Path) -> Result<Archive, ArchiveError> {
        let file =
            super::file::open_regular(path).map_err(|source| ArchiveError::Io { path: path.to_path_buf(), source })?;
        Self::from_file(file, path)
    }

    /// [`Archive::open`] of a file already open (`path` names it in messages).
    pub fn from_file(file: File, path: &Path) -> Result<Archive, ArchiveError> {
        let io_err = |source| ArchiveError::Io { path: path.to_path_buf(), source };
        let mut head = [0u8; 4];
        let n = file.read_at(&mut head, 0).map_err(io_err)?;
        let compression = Compression::sniff(&head[..n]);
        let (file, decompressed) = match compression {
            Compression::None => (file, false),
            c => (decompress(file, c).map_err(io_err)?, true),
        };
        let entries = scan(&file, path)?;
        Ok(Archive { path: path.to_path_buf(), file: Arc::new(file), entries, decompressed })
    }

    /// The archive's path (the compressed file, if it was compressed).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the archive was decompressed into a temp file.
    pub fn was_compressed(&self) -> bool {
        self.decompressed
    }

    /// The (decompressed) tar file, for reading blob data at entry offsets.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// A regular file by path (`./` prefixes are ignored).
    pub fn entry(&self, name: &str) -> Option<Entry> {
        self.entries.get(normalize(name)).copied()
    }

    /// Every regular file, by path.
    pub fn entries(&self) -> impl Iterator<Item = (&str, Entry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// The blob `blobs/sha256/<hex>` of an OCI layout.
    pub fn blob(&self, digest: &Digest) -> Option<Entry> {
        self.entry(&digest.layout_path())
    }

    /// Reads a small file (JSON) whole, refusing anything over `limit` bytes.
    pub fn read(&self, name: &str, limit: u64) -> Result<Vec<u8>, ArchiveError> {
        let entry = self
            .entry(name)
            .ok_or_else(|| ArchiveError::Missing { path: self.path.clone(), entry: name.to_string() })?;
        if entry.size > limit {
            return Err(ArchiveError::TooLarge {
                path: self.path.clone(),
                entry: name.to_string(),
                size: entry.size,
                limit,
            });
        }
        self.read_entry(entry)
    }

    /// Reads an entry's data whole.
    pub fn read_entry(&self, entry: Entry) -> Result<Vec<u8>, ArchiveError> {
        let mut buf = vec![0; entry.size as usize];
        self.file
            .read_exact_at(&mut buf, entry.offset)
            .map_err(|source| ArchiveError::Io { path: self.path.clone(), source })?;
        Ok(buf)
    }
}

fn normalize(name: &str) -> &str {
    let mut n = name;
    while let Some(rest) = n.strip_prefix("./") {
        n = rest;
    }
    n.trim_start_matches('/')
}

/// Streams a compressed archive once into an unlinked temp file, refusing
/// one that expands past [`max_expanded`] (a decompression bomb would fill
/// the disk, or a tmpfs `/tmp`'s memory).
fn decompress(file: File, compression: Compression) -> io::Result<File> {
    let limit = max_expanded(file.metadata()?.len());
    let mut out = tempfile::tempfile()?;
    let input = io::BufReader::with_capacity(1 << 20, file);
    let reader: Box<dyn Read> = match compression {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(input)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(input)?),
        Compression::None => Box::new(input),
    };
    let copied = io::copy(&mut reader.take(limit + 1), &mut out)?;
    if copied > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "decompresses to more than {limit} bytes, {EXPANSION} times its size: refused (a decompression bomb?)"
            ),
        ));
    }
    Ok(out)
}

/// How much larger than its compressed size an archive may expand: image
/// layers are compressed already, so real archives expand a few times at most.
const EXPANSION: u64 = 32;

/// The most a compressed archive of `len` bytes may expand to.
pub fn max_expanded(len: u64) -> u64 {
    len.saturating_mul(EXPANSION).max(64 << 20)
}

/// Parses an octal (or GNU base-256) numeric header field.
fn parse_number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // base-256: big-endian, first byte's top bit is the marker.
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(b as u64)?;
        }
        return Some(v);
    }
    let s: Vec<u8> = field.iter().copied().take_while(|&b| b != 0).collect();
    let s = std::str::from_utf8(&s).ok()?.trim();
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

fn checksum_ok(h: &[u8; 512]) -> bool {
    let Some(stored) = parse_number(&h[148..156]) else { return false };
    let sum: u64 = h.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { b as u64 }).sum();
    sum == stored
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// PAX records `"<len> <key>=<value>\n"` → (key, value) pairs.
fn parse_pax(data: &[u8]) -> Result<Vec<(String, String)>, PaxProblem> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest.iter().position(|&b| b == b' ').ok_or(PaxProblem::NoLength)?;
        let len: usize =
            std::str::from_utf8(&rest[..sp]).ok().and_then(|s| s.parse().ok()).ok_or(PaxProblem::BadLength)?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(PaxProblem::LengthDoesNotFit(len));
        }
        let record = &rest[sp + 1..len - 1];
        let eq = record.iter().position(|&b| b == b'=').ok_or(PaxProblem::NoEquals)?;
        let key = String::from_utf8_lossy(&record[..eq]).into_owned();
        let value = String::from_utf8_lossy(&record[eq + 1..]).into_owned();
        out.push((key, value));
        rest = &rest[len..];
    }
    Ok(out)
}

/// Reads headers from the start, seeking over data, and records every
/// regular file. Later entries with the same path replace earlier ones, as
/// extraction would.
fn scan(file: &File, path: &Path) -> Result<BTreeMap<String, Entry>, ArchiveError> {
    let io_err = |source| ArchiveError::Io { path: path.to_path_buf(), source };
    let len = file.metadata().map_err(io_err)?.len();
    let mut entries = BTreeMap::new();
    let mut pos = 0u64;
    let mut pax_path: Option<String> = None;
    let mut pax_size: Option<u64> = None;
    let mut long_name: Option<String> = None;
    let mut header = [0u8; 512];
    while pos + BLOCK <= len {
        file.read_exact_at(&mut header, pos).map_err(io_err)?;
        if header.iter().all(|&b| b == 0) {
            break; // end-of-archive marker
        }
        if !checksum_ok(&header) {
            return Err(ArchiveError::NotTar { path: path.to_path_buf(), offset: pos });
        }
        let kind = header[156];
        let mut size =
            parse_number(&header[124..136]).ok_or(ArchiveError::NotTar { path: path.to_path_buf(), offset: pos })?;
        let data = pos + BLOCK;
        // Every size is checked against the file before any arithmetic on
        // it: a crafted size near 2^64 must not wrap the offsets around.
        let read_meta = |size: u64| -> Result<Vec<u8>, ArchiveError> {
            if size > MAX_META || size > len - data {
                return Err(ArchiveError::BadPax {
                    path: path.to_path_buf(),
                    offset: pos,
                    why: PaxProblem::TooLarge(size),
                });
            }
            let mut buf = vec![0; size as usize];
            file.read_exact_at(&mut buf, data).map_err(io_err)?;
            Ok(buf)
        };
        let truncated = |entry: String, size: u64| ArchiveError::Truncated {
            path: path.to_path_buf(),
            entry,
            end: data.saturating_add(size),
            len,
        };
        match kind {
            b'x' => {
                let records = parse_pax(&read_meta(size)?).map_err(|why| ArchiveError::BadPax {
                    path: path.to_path_buf(),
                    offset: pos,
                    why,
                })?;
                for (k, v) in records {
                    match k.as_str() {
                        "path" => pax_path = Some(v),
                        "size" => {
                            pax_size = Some(v.parse().map_err(|_| ArchiveError::BadPax {
                                path: path.to_path_buf(),
                                offset: pos,
                                why: PaxProblem::BadSize(v.clone()),
                            })?)
                        }
                        _ => {}
                    }
                }
            }
            b'L' => {
                let name = read_meta(size)?;
                long_name = Some(cstr(&name));
            }
            b'g' | b'K' => {
                if size > len - data {
                    return Err(truncated(format!("(extended header at offset {pos})"), size));
                }
            }
            _ => {
                if let Some(s) = pax_size.take() {
                    size = s;
                }
                let name = match (pax_path.take(), long_name.take()) {
                    (Some(p), _) => p,
                    (None, Some(l)) => l,
                    (None, None) => {
                        let name = cstr(&header[0..100]);
                        let prefix =
                            if &header[257..262] == b"ustar" { cstr(&header[345..500]) } else { String::new() };
                        if prefix.is_empty() {
                            name
                        } else {
                            format!("{prefix}/{name}")
                        }
                    }
                };
                if size > len - data {
                    return Err(truncated(name, size));
                }
                if kind == b'0' || kind == 0 || kind == b'7' {
                    entries.insert(normalize(&name).to_string(), Entry { offset: data, size });
                }
            }
        }
        // size <= len - data here, so this cannot wrap; the next header is
        // always further on.
        pos = data + size.div_ceil(BLOCK) * BLOCK;
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tar_with(entries: &[(&str, Vec<u8>)], gnu: bool) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = if gnu { tar::Header::new_gnu() } else { tar::Header::new_ustar() };
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn write_tmp(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn indexes_entries_long_names_and_pax_paths() {
        let long = format!("{}/file.json", "d".repeat(150));
        let bytes = tar_with(&[("./index.json", b"{}".to_vec()), (&long, vec![1; 700])], true);
        let f = write_tmp(&bytes);
        let a = Archive::open(f.path()).unwrap();
        assert_eq!(a.read("index.json", 10).unwrap(), b"{}");
        let e = a.entry(&long).unwrap();
        assert_eq!(e.size, 700);
        assert_eq!(a.read_entry(e).unwrap(), vec![1; 700]);
        assert!(matches!(a.read(&long, 10), Err(ArchiveError::TooLarge { .. })));
        assert!(matches!(a.read("nope", 10), Err(ArchiveError::Missing { .. })));
    }

    #[test]
    fn pax_size_overrides_header_size() {
        // A ustar header with size 0 and the real size in a PAX record, as
        // preseed's layout writes for blobs over 8 GiB.
        let data = vec![9u8; 1000];
        let mut out = Vec::new();
        let rec = b"13 size=1000\n";
        let mut h = tar::Header::new_ustar();
        h.set_path("PaxHeaders/x").unwrap();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(rec.len() as u64);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(rec);
        out.resize(out.len().div_ceil(512) * 512, 0);
        let mut h = tar::Header::new_ustar();
        h.set_path("blobs/sha256/abc").unwrap();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(0);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        let offset = out.len() as u64;
        out.extend_from_slice(&data);
        out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
        let f = write_tmp(&out);
        let a = Archive::open(f.path()).unwrap();
        assert_eq!(a.entry("blobs/sha256/abc"), Some(Entry { offset, size: 1000 }));
    }

    #[test]
    fn compressed_archives_are_decompressed_once() {
        let bytes = tar_with(&[("manifest.json", b"[]".to_vec())], false);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&bytes).unwrap();
        let f = write_tmp(&gz.finish().unwrap());
        let a = Archive::open(f.path()).unwrap();
        assert!(a.was_compressed());
        assert_eq!(a.read("manifest.json", 10).unwrap(), b"[]");
        let z = zstd::encode_all(&bytes[..], 3).unwrap();
        let f = write_tmp(&z);
        assert_eq!(Archive::open(f.path()).unwrap().read("manifest.json", 10).unwrap(), b"[]");
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        let f = write_tmp(&[7u8; 2048]);
        assert!(matches!(Archive::open(f.path()), Err(ArchiveError::NotTar { offset: 0, .. })));
        let bytes = tar_with(&[("a", vec![1; 4000])], false);
        let f = write_tmp(&bytes[..2048]);
        assert!(matches!(Archive::open(f.path()), Err(ArchiveError::Truncated { .. })));
    }

    #[test]
    fn reads_preseed_layout_tarballs() {
        use crate::build::cache::BlobCache;
        use crate::build::layout::{plan_tarball, TarballSpec};
        use crate::oci::{self, Descriptor};
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(dir.path()).unwrap();
        let layer = vec![3u8; 9000];
        let dl = cache.put_bytes(&layer).unwrap();
        let spec = TarballSpec {
            name: "docker.io/library/x:1".into(),
            tag: Some("1".into()),
            extra_names: vec![],
            root: Descriptor::new(oci::OCI_LAYER_GZIP, dl.clone(), layer.len() as u64),
            blobs: vec![Descriptor::new(oci::OCI_LAYER_GZIP, dl.clone(), layer.len() as u64)],
        };
        let mut bytes = Vec::new();
        plan_tarball(&spec, &cache).reader().read_to_end(&mut bytes).unwrap();
        let f = write_tmp(&bytes);
        let a = Archive::open(f.path()).unwrap();
        let e = a.blob(&dl).unwrap();
        assert_eq!(e.offset % 4096, 0);
        assert_eq!(a.read_entry(e).unwrap(), layer);
        assert!(a.entry("oci-layout").is_some());
    }
}
