//! The content-addressed blob cache: `<cache>/blobs/sha256/<hex>`, shared by
//! every image and every run, and beside it what the registries listed as
//! each image's signatures and referrers (`signatures/`, `referrers/`).
//!
//! Architecture invariant: a file exists under a digest's name only if its
//! bytes hash to that digest. Writers stream into a temp file in the same
//! directory while hashing and rename it into place only after digest and
//! size match, so a killed run leaves at most a stray temp file (removed by
//! the next [`BlobCache::open`]), never a wrong blob. A writer holds a lock
//! on its temp file, so another run sharing the cache never removes a
//! download still going on.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::digest::{Digest, Hasher, HashingWriter};

/// Errors of the blob cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Content did not hash to the digest it was fetched or stored as.
    #[error("digest mismatch for {what}: expected {expected}, got {found}")]
    DigestMismatch {
        /// What was being stored (blob URL, file…).
        what: String,
        /// The digest it should have.
        expected: Digest,
        /// The digest it has.
        found: Digest,
    },
    /// Content had another length than its descriptor says.
    #[error("size mismatch for {what}: expected {expected} bytes, got {found}")]
    SizeMismatch {
        /// What was being stored.
        what: String,
        /// Size from the descriptor.
        expected: u64,
        /// Bytes received.
        found: u64,
    },
    /// A filesystem error, with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Listings kept beside the blobs (see [`BlobCache::keep`]): the signatures
/// `[verify]` checked, and what refers to each image.
pub const SIGNATURES: &str = "signatures";
/// See [`SIGNATURES`].
pub const REFERRERS: &str = "referrers";

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io { path: path.to_path_buf(), source }
}

/// Handle on a cache directory.
#[derive(Clone, Debug)]
pub struct BlobCache {
    root: PathBuf,
}

impl BlobCache {
    /// Opens (creating) a cache at `root` and removes temp files left by killed runs.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, CacheError> {
        let root = root.into();
        let blobs = root.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        for dir in [blobs, root.join(SIGNATURES), root.join(REFERRERS)] {
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries {
                let entry = entry.map_err(io_err(&dir))?;
                if entry.file_name().to_string_lossy().starts_with(".tmp") {
                    // Its writer is gone once nobody holds its lock.
                    if File::open(entry.path()).is_ok_and(|f| f.try_lock().is_ok()) {
                        let _ = fs::remove_file(entry.path());
                    }
                }
            }
        }
        Ok(BlobCache { root })
    }

    /// The cache's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with this digest lives (whether or not it is there yet).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join(digest.layout_path())
    }

    /// Whether the blob is present with the given size. Presence implies the
    /// digest matched when it was stored (the invariant above).
    pub fn contains(&self, digest: &Digest, size: u64) -> bool {
        fs::metadata(self.path(digest)).map(|m| m.is_file() && m.len() == size).unwrap_or(false)
    }

    /// Starts storing a blob expected to have `digest` and `size`.
    pub fn writer(&self, digest: &Digest, size: Option<u64>, what: &str) -> Result<BlobWriter, CacheError> {
        let dir = self.root.join("blobs/sha256");
        let tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(&dir).map_err(io_err(&dir))?;
        // Held until the temp file is renamed or removed: see `open`.
        tmp.as_file().lock().map_err(io_err(tmp.path()))?;
        Ok(BlobWriter {
            out: HashingWriter::new(tmp),
            expected: digest.clone(),
            size,
            dest: self.path(digest),
            what: what.to_string(),
        })
    }

    /// Stores bytes the caller produced and returns their digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest, CacheError> {
        let digest = Digest::of(bytes);
        if !self.contains(&digest, bytes.len() as u64) {
            let mut w = self.writer(&digest, Some(bytes.len() as u64), "generated blob")?;
            w.write_all(bytes).map_err(io_err(&self.root))?;
            w.commit()?;
        }
        Ok(digest)
    }

    /// Keeps what a registry listed for `subject` under `kind` ([`SIGNATURES`],
    /// [`REFERRERS`]), so that an `--offline` run finds the same: written to a
    /// temp file and renamed, so a killed run leaves the old listing or the
    /// new one, never a torn one.
    pub fn keep(&self, kind: &str, subject: &Digest, bytes: &[u8]) -> Result<(), CacheError> {
        let dir = self.root.join(kind);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(&dir).map_err(io_err(&dir))?;
        tmp.as_file().lock().map_err(io_err(tmp.path()))?;
        tmp.write_all(bytes).map_err(io_err(tmp.path()))?;
        let dest = self.listing(kind, subject);
        tmp.persist(&dest).map_err(|e| CacheError::Io { path: dest.clone(), source: e.error })?;
        Ok(())
    }

    /// What [`keep`](Self::keep) kept for `subject` under `kind`, if anything.
    pub fn kept(&self, kind: &str, subject: &Digest) -> Option<Vec<u8>> {
        fs::read(self.listing(kind, subject)).ok()
    }

    fn listing(&self, kind: &str, subject: &Digest) -> PathBuf {
        self.root.join(kind).join(format!("{}.json", subject.hex()))
    }

    /// Reads a whole (small) blob, e.g. a manifest. Callers must only use it
    /// for metadata blobs: layers are streamed, never read into memory.
    pub fn read_small(&self, digest: &Digest) -> Result<Vec<u8>, CacheError> {
        let path = self.path(digest);
        let mut out = Vec::new();
        File::open(&path).and_then(|mut f| f.read_to_end(&mut out)).map_err(io_err(&path))?;
        Ok(out)
    }

    /// Hashes the cached blobs `blobs` again, on all cores, and returns those
    /// whose bytes no longer match their name (damaged after they were
    /// stored: disk errors, hand edits), with the digest they hash to. A
    /// missing or unreadable file counts as damaged too.
    pub fn check(&self, blobs: &[Digest]) -> Vec<(Digest, String)> {
        let size = |d: &Digest| fs::metadata(self.path(d)).map_or(0, |m| m.len());
        let problems = crate::parallel::map(blobs, size, |d| {
            let path = self.path(d);
            let mut h = Hasher::new();
            match File::open(&path).and_then(|mut f| io::copy(&mut f, &mut h)) {
                Ok(_) => Some(h.finish()).filter(|found| found != d).map(|found| format!("its bytes hash to {found}")),
                Err(e) => Some(format!("reading {}: {e}", path.display())),
            }
        });
        blobs.iter().zip(problems).filter_map(|(d, p)| p.map(|p| (d.clone(), p))).collect()
    }

    /// Removes a blob from the cache (a damaged one, so it is fetched again).
    pub fn evict(&self, digest: &Digest) -> Result<(), CacheError> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
            _ => Ok(()),
        }
    }

    /// Re-hashes every blob and removes those whose content does not match
    /// their name. Returns the removed digests. Normal runs never need this
    /// (a bundle re-hashes what it takes from the cache); tests of the
    /// invariant use it.
    pub fn verify_all(&self) -> Result<Vec<PathBuf>, CacheError> {
        let dir = self.root.join("blobs/sha256");
        let mut bad = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let ok = match format!("sha256:{name}").parse::<Digest>() {
                Ok(expected) => {
                    let mut h = Hasher::new();
                    let mut f = File::open(&path).map_err(io_err(&path))?;
                    io::copy(&mut f, &mut h).map_err(io_err(&path))?;
                    h.finish() == expected
                }
                Err(_) => false,
            };
            if !ok {
                bad.push(path);
            }
        }
        Ok(bad)
    }
}

/// A blob being stored: write bytes, then [`BlobWriter::commit`].
pub struct BlobWriter {
    out: HashingWriter<tempfile::NamedTempFile>,
    expected: Digest,
    size: Option<u64>,
    dest: PathBuf,
    what: String,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.out.hasher.len()
    }

    /// Checks size and digest; on success moves the blob into place. On
    /// failure the temp file is deleted and nothing is stored.
    pub fn commit(self) -> Result<PathBuf, CacheError> {
        let HashingWriter { inner: tmp, hasher } = self.out;
        let found_size = hasher.len();
        if let Some(expected) = self.size {
            if expected != found_size {
                return Err(CacheError::SizeMismatch { what: self.what, expected, found: found_size });
            }
        }
        let found = hasher.finish();
        if found != self.expected {
            return Err(CacheError::DigestMismatch { what: self.what, expected: self.expected, found });
        }
        // Blobs are immutable once named; read-only guards against accidents.
        let mut perms = tmp.as_file().metadata().map_err(io_err(&self.dest))?.permissions();
        perms.set_readonly(true);
        let _ = tmp.as_file().set_permissions(perms);
        tmp.persist(&self.dest).map_err(|e| CacheError::Io { path: self.dest.clone(), source: e.error })?;
        Ok(self.dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_content_is_never_named() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(dir.path()).unwrap();
        let want = Digest::of(b"right");
        let mut w = cache.writer(&want, Some(5), "test").unwrap();
        w.write_all(b"wrong").unwrap();
        assert!(matches!(w.commit(), Err(CacheError::DigestMismatch { .. })));
        assert!(!cache.contains(&want, 5));
        let d = cache.put_bytes(b"right").unwrap();
        assert_eq!(d, want);
        assert!(cache.contains(&want, 5));
        assert!(cache.verify_all().unwrap().is_empty());
        assert_eq!(fs::read_dir(dir.path().join("blobs/sha256")).unwrap().count(), 1);
    }

    #[test]
    fn listings_replace_whole_and_a_killed_writers_temp_file_goes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(dir.path()).unwrap();
        let subject = Digest::of(b"image");
        assert_eq!(cache.kept(REFERRERS, &subject), None);
        cache.keep(REFERRERS, &subject, b"[1]").unwrap();
        cache.keep(REFERRERS, &subject, b"[2]").unwrap();
        assert_eq!(cache.kept(REFERRERS, &subject).as_deref(), Some(&b"[2]"[..]));
        // What a run killed mid-write leaves: an unlocked temp file.
        fs::write(dir.path().join(REFERRERS).join(".tmp-killed"), b"[").unwrap();
        BlobCache::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join(REFERRERS)).unwrap().count(), 1);
    }
}
