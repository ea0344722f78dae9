//! Stage 1: every image of the manifest, resolved (remote: its manifests,
//! pinned by digest, through the registry client) or built (in-tree: a
//! workspace package under `images/`, packed straight into the cache).

use std::path::Path;

use super::{BundleError, Planned, Run};
use crate::build::intree::{self, BuildOptions};
use crate::build::manifest::{ImageEntry, ImageSource};
use crate::build::registry::{resolve_image, ResolvedImage};
use crate::digest::Digest;
use crate::partition::index::IndexedReferrer;

/// Resolves or builds every image, in manifest order.
pub(super) async fn images(run: &Run<'_>) -> Result<Vec<Planned>, BundleError> {
    let opts = run.opts;
    let mut images = Vec::new();
    for entry in &run.manifest.images {
        let resolved = match &entry.source {
            ImageSource::Remote => {
                let mut entry = entry.clone();
                if entry.reference.digest.is_none() {
                    // Only reachable with --allow-unpinned.
                    let d = run.registries.resolve_tag(&entry.label(), &entry.reference).await?;
                    entry.reference = entry.reference.with_digest(d);
                }
                let mut resolved = resolve_image(&run.registries, &entry, &run.cache, opts.offline).await?;
                let referrers = carry_referrers(run, &entry, &mut resolved).await?;
                images.push(Planned { entry, resolved, referrers });
                continue;
            }
            ImageSource::Build(package) => {
                let workspace = match &opts.workspace {
                    Some(w) => w.clone(),
                    None => opts.manifest.parent().unwrap_or(Path::new(".")).to_path_buf(),
                };
                let workspace_manifest = workspace.join("Cargo.toml");
                if !workspace_manifest.is_file() {
                    return Err(BundleError::NoWorkspace { image: entry.label(), manifest: workspace_manifest });
                }
                // Built in <workspace>/target/preseed-images, apart from normal builds.
                let mut build_opts = BuildOptions::new(workspace_manifest);
                build_opts.offline = opts.offline;
                run.progress().line(&format!("building {} from package {package}", entry.label()));
                let built = intree::build_image(package, &run.cache, &build_opts)?;
                ResolvedImage { root: built.root, blobs: built.blobs, platforms: vec![built.platform] }
            }
        };
        images.push(Planned { entry: entry.clone(), resolved, referrers: Vec::new() });
    }
    Ok(images)
}

/// The signatures, attestations and SBOMs of `entry` its `referrers` asks
/// for, of its root and of each platform manifest it keeps (a signature on
/// one platform's manifest is carried with that platform); their blobs join
/// the image's, after its own.
async fn carry_referrers(
    run: &Run<'_>,
    entry: &ImageEntry,
    resolved: &mut ResolvedImage,
) -> Result<Vec<IndexedReferrer>, BundleError> {
    if entry.referrers.is_empty() {
        return Ok(Vec::new());
    }
    let subjects: Vec<Digest> = std::iter::once(resolved.root.digest.clone())
        .chain(
            resolved
                .blobs
                .iter()
                .filter(|b| crate::oci::is_manifest(&b.media_type) && b.digest != resolved.root.digest)
                .map(|b| b.digest.clone()),
        )
        .collect();
    let mut referrers = Vec::new();
    for subject in &subjects {
        let carried = run
            .registries
            .referrers(&entry.label(), &entry.reference, subject, &entry.referrers, &run.cache, run.opts.offline)
            .await?;
        for c in carried {
            for d in c.blobs {
                if resolved.blobs.iter().all(|b| b.digest != d.digest) {
                    resolved.blobs.push(d);
                }
            }
            referrers.push(c.referrer);
        }
    }
    Ok(referrers)
}
