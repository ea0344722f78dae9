//! In-tree images: workspace packages under `images/` built into one-layer
//! OCI images straight into the blob cache. (Being implemented; see issue 4.)

use std::path::PathBuf;

use crate::fetch::cache::BlobCache;
use crate::oci::{Descriptor, Platform};

/// Where and how to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The workspace's root `Cargo.toml`.
    pub workspace_manifest: PathBuf,
    /// Target directory for the image builds.
    pub target_dir: PathBuf,
    /// Pass `--offline` to cargo.
    pub offline: bool,
}

/// A built image, all blobs in the cache.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    /// The image manifest.
    pub root: Descriptor,
    /// Manifest, config, layer.
    pub blobs: Vec<Descriptor>,
    /// Its platform.
    pub platform: Platform,
}

/// Errors building an in-tree image.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Not implemented yet.
    #[error("in-tree image {0:?}: building in-tree images is not implemented yet")]
    NotYet(String),
}

/// Builds workspace package `package` into an image in `cache`.
pub fn build_image(package: &str, _cache: &BlobCache, _opts: &BuildOptions) -> Result<BuiltImage, BuildError> {
    Err(BuildError::NotYet(package.to_string()))
}
