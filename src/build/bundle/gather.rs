//! Stage 1: every image of the manifest, resolved (remote: its manifests,
//! pinned by digest, through the registry client) or built (in-tree: a
//! workspace package under `images/`, packed straight into the cache).

use std::path::Path;

use super::{BundleError, Planned, Run};
use crate::build::intree::{self, BuildOptions};
use crate::build::manifest::ImageSource;
use crate::build::registry::{resolve_image, ResolvedImage};

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
                let resolved = resolve_image(&run.registries, &entry, &run.cache, opts.offline).await?;
                images.push(Planned { entry, resolved });
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
        images.push(Planned { entry: entry.clone(), resolved });
    }
    Ok(images)
}
