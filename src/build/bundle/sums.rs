//! Tarball sha256s for `preseed.json`: computed in the background as soon as
//! a tarball's last blob is in the cache ([`SumQueue`]), and remembered by
//! plan ([`TarballSums`]) so a warm bundle does not read every blob again.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::build::cache::BlobCache;
use crate::build::layout::tree::PlannedFile;
use crate::build::layout::{self, TarballSpec};
use crate::digest::{Digest, Hasher};

/// Tarball sums computed in the background, one per core at most, each
/// started once every blob of its tarball is in the cache.
pub(super) struct SumQueue {
    planned: Arc<Vec<(TarballSpec, PlannedFile)>>,
    store: Arc<TarballSums>,
    cores: Arc<tokio::sync::Semaphore>,
    running: BTreeMap<usize, tokio::task::JoinHandle<std::io::Result<Digest>>>,
}

impl SumQueue {
    pub(super) fn new(planned: Arc<Vec<(TarballSpec, PlannedFile)>>, store: Arc<TarballSums>) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        SumQueue { planned, store, cores: Arc::new(tokio::sync::Semaphore::new(cores)), running: BTreeMap::new() }
    }

    /// Starts hashing tarball `i` (its blobs are all in the cache).
    pub(super) fn start(&mut self, i: usize) {
        let (planned, store, cores) = (self.planned.clone(), self.store.clone(), self.cores.clone());
        let task = tokio::spawn(async move {
            let _core = cores.acquire_owned().await.expect("semaphore never closed");
            tokio::task::spawn_blocking(move || {
                let (spec, file) = &planned[i];
                store.get_or_compute(spec, file)
            })
            .await
            .expect("tarball hashing panicked")
        });
        self.running.insert(i, task);
    }

    /// Every tarball's sum, in order.
    pub(super) async fn finish(mut self) -> std::io::Result<Vec<Digest>> {
        let mut out = Vec::with_capacity(self.planned.len());
        for i in 0..self.planned.len() {
            if !self.running.contains_key(&i) {
                self.start(i);
            }
            let task = self.running.remove(&i).expect("just started");
            out.push(task.await.expect("tarball hashing task panicked")?);
        }
        Ok(out)
    }
}

/// Remembers tarball sha256s by what determines the tarball's bytes (the
/// plan: index.json and blob digests), so a warm bundle does not re-read
/// every blob to hash tarballs it has hashed before.
pub(super) struct TarballSums {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct TarballSum {
    size: u64,
    sha256: Digest,
}

impl TarballSums {
    pub(super) fn open(cache: &BlobCache) -> Self {
        TarballSums { dir: cache.root().join("tarballs") }
    }

    /// Where the sum of this tarball plan is remembered.
    pub(super) fn key_path(&self, spec: &TarballSpec, file: &PlannedFile) -> PathBuf {
        let mut key = Hasher::new();
        key.update(&layout::index_json(spec));
        for b in &spec.blobs {
            key.update(format!("\n{} {}", b.digest, b.size).as_bytes());
        }
        key.update(format!("\nlayout v1 {}", file.len()).as_bytes());
        self.dir.join(key.finish().hex())
    }

    fn get_or_compute(&self, spec: &TarballSpec, file: &PlannedFile) -> std::io::Result<Digest> {
        let path = self.key_path(spec, file);
        if let Ok(bytes) = std::fs::read(&path) {
            if let Ok(sum) = serde_json::from_slice::<TarballSum>(&bytes) {
                if sum.size == file.len() {
                    return Ok(sum.sha256);
                }
            }
        }
        let mut h = Hasher::new();
        let mut reader = file.reader();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        let sha256 = h.finish();
        std::fs::create_dir_all(&self.dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        serde_json::to_writer(&mut tmp, &TarballSum { size: file.len(), sha256: sha256.clone() })?;
        tmp.persist(&path).map_err(|e| e.error)?;
        Ok(sha256)
    }
}
