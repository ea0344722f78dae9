//! Stage 4: every blob the cache lacks, downloaded once whichever image needs
//! it, `--jobs` at a time, each byte hashed on the way in. For erofs, each
//! verified blob is copied straight into the staged image (its blocks follow
//! from the plan); each tarball's sum starts as soon as its last blob is in.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::stream::{self, StreamExt, TryStreamExt};

use super::sums::{SumQueue, TarballSums};
use super::{io_err, BundleError, Plan, Run};
use crate::build::registry::ResolveError;
use crate::build::write::erofs;
use crate::digest::Digest;
use crate::oci::Descriptor;
use crate::partition::Format;

/// What the download stage leaves for the write.
pub(super) struct Fetched {
    /// Each tarball's sha256, in plan order.
    pub(super) sums: Vec<Digest>,
    /// Where each sum is remembered (removed if a blob it read was damaged).
    pub(super) sum_keys: Vec<PathBuf>,
    /// The erofs image with every downloaded blob already in place.
    pub(super) staged: Option<erofs::Staged>,
    /// Blobs taken from the cache, not downloaded (and so not hashed) in
    /// this run: hashed again while the partition is written. Largest first.
    pub(super) unverified: Vec<Digest>,
    /// Bytes of the distinct blobs the partition carries.
    pub(super) unique_bytes: u64,
    /// Bytes downloaded in this run.
    pub(super) downloaded_bytes: u64,
}

/// Downloads what the cache lacks (or, `--offline`, fails naming the first).
pub(super) async fn missing_blobs(run: &Run<'_>, plan: &Plan) -> Result<Fetched, BundleError> {
    let (opts, cache) = (run.opts, &run.cache);
    let planned = &plan.tarballs;
    let sums_store = Arc::new(TarballSums::open(cache));
    let mut sums = SumQueue::new(planned.clone(), sums_store.clone());

    let mut missing: BTreeMap<Digest, (usize, Descriptor)> = BTreeMap::new();
    let mut unique: HashMap<Digest, u64> = HashMap::new();
    for (i, img) in plan.images.iter().enumerate() {
        for blob in &img.resolved.blobs {
            unique.insert(blob.digest.clone(), blob.size);
            if !cache.contains(&blob.digest, blob.size) {
                missing.entry(blob.digest.clone()).or_insert((i, blob.clone()));
            }
        }
    }
    let unique_bytes: u64 = unique.values().sum();
    if opts.offline {
        if let Some((d, (i, _))) = missing.iter().next() {
            return Err(ResolveError::NotCached {
                image: plan.images[*i].entry.label(),
                digest: d.clone(),
                cache: cache.root().display().to_string(),
            }
            .into());
        }
    }
    let downloaded_bytes: u64 = missing.values().map(|(_, d)| d.size).sum();
    let staging = run.staging();
    // An erofs image's blocks follow from the plan, so each downloaded blob
    // goes into the image as soon as it is verified; only `preseed.json`
    // waits for the tarball sums (a stand-in of the same length holds its
    // place until then).
    let staged = match run.format {
        Format::Erofs if !missing.is_empty() => {
            let stand_in: Vec<Digest> =
                (0..planned.len()).map(|i| Digest::of(format!("preseed stand-in sum {i}").as_bytes())).collect();
            let (provisional, _) = plan.assemble(stand_in, run.format);
            let staged = erofs::Staged::new(&provisional, &staging)
                .map_err(|source| BundleError::Erofs { path: staging.clone(), source })?;
            Some(Arc::new(staged))
        }
        _ => None,
    };
    let mut placing = tokio::task::JoinSet::new();
    // How many blobs each tarball still waits for, and who waits for each.
    let mut waiting = vec![0usize; planned.len()];
    let mut waiters: HashMap<&Digest, Vec<usize>> = HashMap::new();
    for (i, (spec, _)) in planned.iter().enumerate() {
        for b in spec.blobs.iter().filter(|b| missing.contains_key(&b.digest)) {
            waiting[i] += 1;
            waiters.entry(&b.digest).or_default().push(i);
        }
        if waiting[i] == 0 {
            sums.start(i);
        }
    }
    if !missing.is_empty() {
        let bar = run.progress().bytes("downloading", downloaded_bytes);
        // One task per download, so hashing and writing use every core.
        let tasks = missing.values().map(|(i, blob)| {
            let (registries, cache, bar) = (run.registries.clone(), cache.clone(), bar.clone());
            let entry = &plan.images[*i].entry;
            let (label, reference, blob) = (entry.label(), entry.reference.clone(), blob.clone());
            async move {
                tokio::spawn(async move {
                    registries
                        .fetch_blob(&label, &reference, &blob, &cache, &|n| bar.inc(n))
                        .await
                        .map(|()| blob.digest)
                })
                .await
                .expect("download task panicked")
            }
        });
        let mut fetched = stream::iter(tasks).buffer_unordered(opts.jobs.max(1));
        while let Some(digest) = fetched.try_next().await? {
            if let Some(staged) = &staged {
                let (staged, path, digest) = (staged.clone(), cache.path(&digest), digest.clone());
                placing.spawn_blocking(move || staged.place(&digest, &path));
            }
            for &i in waiters.get(&digest).into_iter().flatten() {
                waiting[i] -= 1;
                if waiting[i] == 0 {
                    sums.start(i);
                }
            }
        }
        bar.finish();
    }
    // Blobs downloaded in this run were hashed on the way in; every other
    // blob taken from the cache is hashed again before the partition built
    // from it is put in place (alongside the write).
    let unverified: Vec<Digest> = {
        let mut u: Vec<(&Digest, &u64)> = unique.iter().filter(|(d, _)| !missing.contains_key(*d)).collect();
        // Largest first, so the workers finish together.
        u.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        u.into_iter().map(|(d, _)| d.clone()).collect()
    };
    while let Some(placed) = placing.join_next().await {
        placed
            .expect("placing task panicked")
            .map_err(|source| BundleError::Erofs { path: staging.clone(), source })?;
    }
    let staged = staged.map(|s| Arc::into_inner(s).expect("every placing task has ended"));
    let sums = sums.finish().await.map_err(io_err(cache.root()))?;
    let sum_keys = planned.iter().map(|(spec, file)| sums_store.key_path(spec, file)).collect();
    Ok(Fetched { sums, sum_keys, staged, unverified, unique_bytes, downloaded_bytes })
}
