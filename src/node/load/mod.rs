//! The node side: import a partition's (or a preload directory's) image
//! tarballs into a running containerd over its gRPC API.
//!
//! Pipeline, on the reading room ([`crate::node::read`]): open the partition
//! read-only (through dm-verity when given a root hash; or take a
//! directory) → list its tarballs → read each by seeking and walk its images
//! into blobs, GC labels and names → [`import`] registers every placed blob
//! (files `preseed place` put in containerd's store) under a lease, then
//! writes what containerd lacks and creates the image records → unpin what
//! is gone → [`lease`] removes leases that interrupted loads left →
//! [`report`].
//!
//! Invariants: the loader never talks to a registry; it never sets
//! `io.cri-containerd.image` (containerd's CRI adds it on the image event);
//! a second load of the same partition writes no content; one bad tarball
//! never stops the others.
//!
//! Labels on image records: `io.cri-containerd.pinned=pinned` where the
//! image is pinned (the sandbox image always is), and `dev.preseed.source=`
//! the source path (`--image` file canonicalized, `--device` path as given,
//! `--dir` canonicalized). A later load from the same source removes the pin
//! from images carrying that source label whose names it no longer has; the
//! images themselves stay, for kubelet's GC to decide.
//!
//! Works with containerd 1.6, 1.7 and 2.x: every record update sends the
//! whole record (as read) with a field mask, as containerd's own clients do.
//! containerd going away mid-load fails the load with a message that says so;
//! the next run completes it.
//!
//! # Running it at boot
//!
//! A oneshot unit between containerd and kubelet:
//!
//! ```ini
//! # /etc/systemd/system/preseed-load.service
//! [Unit]
//! Description=Import preseeded container images into containerd
//! After=containerd.service
//! Requires=containerd.service
//! Before=kubelet.service
//!
//! [Service]
//! Type=oneshot
//! RemainAfterExit=yes
//! ExecStart=/usr/bin/preseed load --device /dev/disk/by-partlabel/preseed
//!
//! [Install]
//! WantedBy=multi-user.target
//! RequiredBy=kubelet.service
//! ```
//!
//! containerd's CRI must use the preseeded sandbox image, or the first pod
//! start tries to pull its default one (containerd 1.6/1.7, config version 2):
//!
//! ```toml
//! [plugins."io.containerd.grpc.v1.cri"]
//!   sandbox_image = "registry.k8s.io/pause:3.10"   # the name in bundles.toml
//! ```
//!
//! (containerd 2.x: `[plugins."io.containerd.cri.v1.images".pinned_images]
//! sandbox = "…"`.) Without CAP_SYS_RESOURCE (some sandboxes, nested
//! containers) the CRI plugin also needs `restrict_oom_score_adj = true`.

pub mod containerd;
pub mod import;
pub mod lease;
pub mod report;
pub mod unpack;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::node::notify;
use crate::node::policy::Policy;
pub use crate::node::read::open::Source;
use crate::node::read::source;
pub use crate::partition::verity::RootHash;
pub use report::{ImageReport, LoadReport, Outcome, StaleLease, Unpinned};

pub use crate::node::DEFAULT_ADDRESS;
/// The CRI label that keeps kubelet's image GC away from an image.
pub const LABEL_PINNED: &str = "io.cri-containerd.pinned";
/// Its value.
pub const PINNED: &str = "pinned";
/// preseed's label on image records: the source they were loaded from, so a
/// later load from the same source can unpin what is gone.
pub const LABEL_SOURCE: &str = "dev.preseed.source";

/// How to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Where the images come from.
    pub source: Source,
    /// containerd's gRPC socket.
    pub address: PathBuf,
    /// How long to wait for containerd to answer.
    pub timeout: Duration,
    /// Blob writes (and images) in flight at once.
    pub jobs: usize,
    /// Also unpack the host platform's layers into the snapshotter.
    pub unpack: bool,
    /// Unpack the boot images only (the sandbox among them), before READY:
    /// the first pods then start from snapshots flushed to disk, not from
    /// containerd's own unpacking, which a power cut can leave empty.
    pub unpack_boot: bool,
    /// Snapshotter to unpack into.
    pub snapshotter: String,
    /// systemd's notification socket (`Type=notify`): READY once the boot
    /// images are in, then progress while the rest are imported.
    pub notify: Option<Arc<notify::Notifier>>,
    /// Read the partition through dm-verity, checked against this root hash.
    pub verity_root_hash: Option<RootHash>,
    /// Images that must be signed, and by whom: those that are not fail.
    pub policy: Option<Arc<Policy>>,
}

impl LoadOptions {
    /// Defaults: containerd's standard socket, 60 s timeout, 4 jobs, no unpack, overlayfs.
    pub fn new(source: Source) -> Self {
        LoadOptions {
            source,
            address: PathBuf::from(DEFAULT_ADDRESS),
            timeout: Duration::from_secs(60),
            jobs: 4,
            unpack: false,
            unpack_boot: false,
            snapshotter: "overlayfs".into(),
            notify: None,
            verity_root_hash: None,
            policy: None,
        }
    }
}

/// A failure that stops the whole load (per-image failures are in the report).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The partition could not be opened.
    #[error(transparent)]
    Open(#[from] crate::node::read::open::OpenError),
    /// The source's contents could not be listed.
    #[error(transparent)]
    Source(#[from] source::SourceError),
    /// The partition's index read as EIO through dm-verity.
    #[error("{source_id}: {error}: {}", crate::node::read::verity::CORRUPT)]
    Corrupt {
        /// The partition.
        source_id: String,
        /// The read that failed.
        error: source::SourceError,
    },
    /// containerd did not answer in time.
    #[error(transparent)]
    Unreachable(#[from] containerd::Unreachable),
}

/// Imports every image of `opts.source` into containerd at `opts.address`.
pub async fn load(opts: &LoadOptions) -> Result<LoadReport, LoadError> {
    load_with(opts, Arc::new(crate::node::sys::Linux)).await
}

/// [`load`] with the given mount syscalls.
pub async fn load_with(opts: &LoadOptions, sys: Arc<dyn crate::node::sys::Sys>) -> Result<LoadReport, LoadError> {
    let start = Instant::now();
    let open_opts = crate::node::read::open::OpenOptions { verity_root_hash: opts.verity_root_hash, mount_at: None };
    let opened = crate::node::read::open::open_with_options(&opts.source, &open_opts, sys)?;
    let (root, source_id) = (opened.root().to_path_buf(), opened.id().to_string());
    let mut listing = match source::list(&root) {
        Ok(l) => l,
        Err(e) if opened.verity().is_some() && crate::node::read::verity::is_eio(&e) => {
            return Err(LoadError::Corrupt { source_id, error: e })
        }
        Err(e) => return Err(e.into()),
    };
    // Images the policy refuses fail like refused index entries, before
    // anything is read from them into containerd.
    let signed = opts.policy.as_ref().map(|p| p.screen(&mut listing)).unwrap_or_default();
    let client = containerd::Client::connect(&opts.address, opts.timeout).await?;
    let mut warnings = listing.warnings.clone();
    let mut errors = Vec::new();
    let containerd_version = match client.version().await {
        Ok((v, _)) => v,
        Err(e) => {
            errors.push(format!("containerd version: {}", containerd::describe(&e)));
            String::new()
        }
    };
    let ctx = Arc::new(import::Context::new(client.clone(), opts, source_id.clone()));
    // Placed blobs first: until registered, any GC that removes a content
    // record deletes them (see `claim_placed`).
    if let Err(e) = ctx.claim_placed(&listing.images).await {
        warnings.push(format!(
            "could not register the placed blobs before importing (any that a GC deletes meanwhile are \
             streamed instead): {e}"
        ));
    }

    // Boot images first; then READY to systemd (kubelet may start); then
    // the rest, fewer at a time so the node's first pods win. A partition
    // that marks no image as boot (older ones, k3s/Monogon directories) is
    // all boot: READY comes after everything, as a oneshot would.
    let all_boot = !listing.images.iter().any(|i| i.boot) && !listing.refused.iter().any(|r| r.boot);
    let (mut boot, background): (Vec<_>, Vec<_>) = listing.images.iter().cloned().partition(|i| i.boot || all_boot);
    for i in &mut boot {
        i.boot = true;
    }
    let jobs = opts.jobs.max(1);
    // Entries preseed.json itself shows to be unusable fail before anything
    // is read from them; with the boot images if they are boot images.
    let (refused_boot, refused_later): (Vec<_>, Vec<_>) =
        listing.refused.iter().map(refused_report).partition(|(boot, _)| *boot || all_boot);
    let mut images: Vec<ImageReport> = refused_boot.into_iter().map(|(_, r)| r).collect();
    images.extend(import_all(&ctx, boot, jobs).await);
    let boot_count = images.len();
    let boot_failed: Vec<String> = images.iter().filter(|i| i.outcome == Outcome::Failed).map(|i| i.label()).collect();
    let mut ready_ms = None;
    let mut skipped = false;
    if let Some(n) = &opts.notify {
        if boot_failed.is_empty() {
            let state = format!(
                "READY=1\nSTATUS={boot_count} boot images ready; importing {} more in the background",
                background.len()
            );
            match n.send(&state) {
                Ok(()) => ready_ms = Some(report::millis(start.elapsed())),
                Err(e) => warnings.push(format!("could not tell systemd the boot images are ready ({n:?}): {e}")),
            }
        } else {
            // No READY: kubelet must not start on a node without them. The
            // rest waits for the next start rather than for a start timeout.
            let _ = n.send(&format!("STATUS=boot images failed: {}", boot_failed.join(", ")));
            errors.push(format!(
                "boot image(s) failed, so systemd was not told the node is ready: {}; {} background image(s) not \
                 imported",
                boot_failed.join(", "),
                background.len() + refused_later.len()
            ));
            skipped = true;
        }
    }
    if !skipped {
        let total = background.len();
        let progress = opts.notify.clone();
        let done = std::sync::atomic::AtomicUsize::new(0);
        let background_jobs = (jobs / 2).max(1);
        let per_tarball: Vec<Vec<ImageReport>> = futures_util::stream::iter(background)
            .map(|img| {
                let (ctx, progress, done) = (ctx.clone(), progress.clone(), &done);
                async move {
                    let r = ctx.import_tarball(img).await;
                    let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    if let Some(p) = progress {
                        let _ = p.send(&format!("STATUS=boot images ready; background images {n}/{total} done"));
                    }
                    r
                }
            })
            .buffered(background_jobs)
            .collect()
            .await;
        images.extend(per_tarball.into_iter().flatten());
        images.extend(refused_later.into_iter().map(|(_, r)| r));
    }

    // Names still in the source keep their pin, failed or not.
    let keep: HashSet<(String, String)> =
        images.iter().flat_map(|i| i.names.iter().map(|n| (i.namespace.clone(), n.clone()))).collect();
    // A tarball that failed before its names were known might hold any of
    // the pinned images: unpin nothing rather than the wrong thing.
    let unknown: Vec<&str> = images.iter().filter(|i| i.names.is_empty()).map(|i| i.tarball.as_str()).collect();
    let unpinned = if skipped {
        Vec::new()
    } else if !unknown.is_empty() {
        warnings.push(format!(
            "not unpinning anything: the names in {} are unknown (it failed to read)",
            unknown.join(", ")
        ));
        Vec::new()
    } else {
        // An image left pinned for ever is a failure, not a footnote.
        let mut unpinned = Vec::new();
        if let Err(e) = unpin_gone(&client, &source_id, &keep, &mut unpinned).await {
            errors.push(format!("could not unpin images no longer in the source: {}", containerd::describe(&e)));
        }
        unpinned
    };
    // Leases of interrupted loads go last: what they hold that the images
    // need is referenced by now, so the GC their removal runs takes only
    // what nothing needs.
    let stale_leases = match lease::remove_stale(&client).await {
        Ok(removed) => removed,
        Err(e) => {
            warnings.push(format!(
                "could not remove leases left by interrupted loads (they expire on their own): {}",
                containerd::describe(&e)
            ));
            Vec::new()
        }
    };
    if let Err(e) = ctx.release_leases().await {
        warnings.push(format!(
            "could not delete the import lease (the next load removes it): {}",
            containerd::describe(&e)
        ));
    }
    drop(opened);
    if let Some(n) = &opts.notify {
        let failed = images.iter().filter(|i| i.outcome == Outcome::Failed).count();
        let _ = n.send(&format!(
            "STATUS=finished: {} images, {failed} failed, {} other errors",
            images.len(),
            errors.len()
        ));
    }
    for i in &mut images {
        i.signed_by = signed.iter().filter(|(rel, _)| *rel == i.tarball).map(|(_, s)| s.clone()).collect();
    }
    let bytes_written = images.iter().map(|i| i.bytes_written).sum();
    let bytes_placed = images.iter().map(|i| i.bytes_placed).sum();
    Ok(LoadReport {
        source: source_id,
        containerd_version,
        images,
        unpinned,
        stale_leases,
        warnings,
        errors,
        bytes_written,
        bytes_placed,
        boot_images: boot_count,
        ready_ms,
        duration_ms: report::millis(start.elapsed()),
    })
}

/// A refused index entry as a failed image of the report, and whether it is
/// a boot image.
fn refused_report(r: &source::Refused) -> (bool, ImageReport) {
    let report = ImageReport {
        namespace: r.namespace.clone(),
        tarball: r.rel.clone(),
        names: r.names.clone(),
        outcome: Outcome::Failed,
        error: Some(r.to_string()),
        blobs_written: 0,
        bytes_written: 0,
        blobs_placed: 0,
        bytes_placed: 0,
        unpacked: false,
        duration_ms: 0,
        signed_by: Vec::new(),
    };
    (r.boot, report)
}

/// Imports `images`, `jobs` tarballs at a time, in order.
async fn import_all(ctx: &Arc<import::Context>, images: Vec<source::SourceImage>, jobs: usize) -> Vec<ImageReport> {
    let per_tarball: Vec<Vec<ImageReport>> = futures_util::stream::iter(images)
        .map(|img| {
            let ctx = ctx.clone();
            async move { ctx.import_tarball(img).await }
        })
        .buffered(jobs)
        .collect()
        .await;
    per_tarball.into_iter().flatten().collect()
}

/// Removes the pinned label from images this loader pinned from `source`
/// whose names are not in `keep`, adding each to `out` as it is done.
async fn unpin_gone(
    client: &containerd::Client,
    source: &str,
    keep: &HashSet<(String, String)>,
    out: &mut Vec<Unpinned>,
) -> Result<(), tonic::Status> {
    for ns in client.namespaces().await? {
        for img in client.images_list(&ns).await? {
            let ours = img.labels.get(LABEL_SOURCE).map(String::as_str) == Some(source);
            let pinned = img.labels.get(LABEL_PINNED).map(String::as_str) == Some(PINNED);
            if !ours || !pinned || keep.contains(&(ns.clone(), img.name.clone())) {
                continue;
            }
            // The record as listed, whole, minus the pin (see `image_update`).
            let mut update = img.clone();
            update.labels.remove(LABEL_PINNED);
            client.image_update(&ns, update, vec![format!("labels.{LABEL_PINNED}")]).await?;
            out.push(Unpinned { namespace: ns.clone(), name: img.name });
        }
    }
    Ok(())
}
