//! The `[verify]` policy: before anything is written, every covered image's
//! pinned digest must carry a valid cosign signature by one of its keys
//! (what counts as one: [`crate::trust::cosign`]).
//!
//! Architecture invariant: this module decides trust and never writes to the
//! output; what it fetches comes through [`crate::build::registry`] (same mirrors,
//! credentials, CAs), and what verified is kept in the cache only so an
//! `--offline` run can check the same signatures again.

use std::path::PathBuf;

use crate::build::cache::BlobCache;
use crate::build::manifest::ImageEntry;
use crate::build::registry::{Registries, ResolveError};
use crate::digest::Digest;
pub use crate::partition::index::SignedBy;
use crate::trust::cosign::{self, Attached, Unsigned};

/// An image that is not signed as its policy requires.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// No valid signature by any of the image's keys for its digest.
    #[error(
        "{image}: {digest} is not signed by {}: {found}. Sign it with `cosign sign --key <private key> {repository}@{digest}`, \
         list the key that signed it under `verify`, or set `verify = false` for this image; nothing was written",
        keys.join(" or ")
    )]
    NotSigned {
        /// Image label.
        image: String,
        /// The pinned digest.
        digest: Digest,
        /// `registry/repository`, for the command to sign it.
        repository: String,
        /// The keys tried, as named in bundles.toml.
        keys: Vec<String>,
        /// What was found instead.
        found: Unsigned,
    },
    /// Signatures could not be fetched.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// `--offline` and no signatures were kept for this digest.
    #[error(
        "{image}: --offline but the signatures of {digest} are not in the cache {cache}: run once without --offline"
    )]
    NotCached {
        /// Image label.
        image: String,
        /// The pinned digest.
        digest: Digest,
        /// Cache dir.
        cache: PathBuf,
    },
}

/// Checks every image (`(entry, pinned digest)`), a few at a time; the
/// result is in the same order. Stops at the first image not signed.
pub async fn check_images(
    registries: &Registries,
    images: &[(&ImageEntry, &Digest)],
    cache: &BlobCache,
    offline: bool,
) -> Result<Vec<Option<SignedBy>>, VerifyError> {
    use futures_util::stream::{self, StreamExt, TryStreamExt};
    stream::iter(images.iter().map(|(entry, digest)| check_image(registries, entry, digest, cache, offline)))
        .buffered(8)
        .try_collect()
        .await
}

/// Checks the signature of one remote image against its keys (no-op for an
/// image the policy does not cover). `digest` is the pinned root digest.
pub async fn check_image(
    registries: &Registries,
    entry: &ImageEntry,
    digest: &Digest,
    cache: &BlobCache,
    offline: bool,
) -> Result<Option<SignedBy>, VerifyError> {
    if entry.verify.is_empty() {
        return Ok(None);
    }
    let image = entry.label();
    let attached: Vec<Attached> = if offline {
        let bytes = cache.kept(crate::build::cache::SIGNATURES, digest).ok_or_else(|| VerifyError::NotCached {
            image: image.clone(),
            digest: digest.clone(),
            cache: cache.root().to_path_buf(),
        })?;
        serde_json::from_slice(&bytes).map_err(|_| VerifyError::NotCached {
            image: image.clone(),
            digest: digest.clone(),
            cache: cache.root().to_path_buf(),
        })?
    } else {
        registries.signatures(&image, &entry.reference, digest).await?
    };
    match cosign::check(digest, &attached, &entry.verify) {
        Ok(signed) => {
            if !offline {
                // Best effort: only an --offline run needs it, and it checks again.
                let _ = cache.keep(
                    crate::build::cache::SIGNATURES,
                    digest,
                    &serde_json::to_vec(&attached).unwrap_or_default(),
                );
            }
            Ok(Some(signed))
        }
        Err(found) => Err(VerifyError::NotSigned {
            image,
            digest: digest.clone(),
            repository: format!("{}/{}", entry.reference.registry, entry.reference.repository),
            keys: entry.verify.iter().map(|k| k.name.clone()).collect(),
            found,
        }),
    }
}
