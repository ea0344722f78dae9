//! Fetching what cosign attaches to an image: sigstore bundles (cosign 3's
//! default) found through the referrers API or, on registries without one,
//! the referrers tag `sha256-<hex>` (an OCI index); and the older
//! `sha256-<hex>.sig` tag (simple-signing payloads in layers, each signature
//! in an annotation).
//!
//! Nothing here decides trust: [`crate::trust::cosign`] checks what is returned.

use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;

use super::{Registries, ResolveError, ACCEPT};
use crate::build::manifest::Reference;
use crate::digest::Digest;
use crate::trust::cosign::signature_layers;
pub use crate::trust::cosign::Attached;

/// Signature artifacts are small JSON documents; anything bigger is refused.
const MAX_ARTIFACT: u64 = 1 << 20;

impl Registries {
    /// Every cosign signature attached to `digest` in `reference`'s
    /// repository, in both formats. An image with none gives an empty list.
    pub async fn signatures(
        &self,
        image: &str,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<Vec<Attached>, ResolveError> {
        let pinned = reference.with_digest(digest.clone());
        let mut found = Vec::new();

        // Referrers API, falling back to the `sha256-<hex>` tag on a 404 (oci-client does both).
        let referrers: Vec<String> = match self
            .with_hosts(image, &pinned, |r| async move { self.client.pull_referrers(&r, None).await })
            .await
        {
            Ok(index) => index.manifests.into_iter().map(|m| m.digest).collect(),
            // Some registries answer the referrers API with another error: try the tag.
            Err(e) => {
                let tag = format!("sha256-{}", digest.hex());
                let Some(bytes) = self.artifact_manifest(image, reference, &tag).await? else { return Err(e) };
                let index: crate::oci::Index = serde_json::from_slice(&bytes).map_err(|_| e)?;
                index.manifests.into_iter().map(|m| m.digest.to_string()).collect()
            }
        };
        let mut manifests = Vec::new();
        for entry in &referrers {
            let Ok(d) = entry.parse::<Digest>() else { continue };
            let Some(bytes) = self.artifact_manifest(image, reference, &d.to_string()).await? else { continue };
            if Digest::of(&bytes) == d {
                manifests.push(bytes);
            }
        }
        // The `.sig` tag of cosign before v3 (and `--new-bundle-format=false`).
        let tag = format!("sha256-{}.sig", digest.hex());
        manifests.extend(self.artifact_manifest(image, reference, &tag).await?);
        for layer in manifests.iter().flat_map(|m| signature_layers(m)) {
            let blob = self.artifact_blob(image, reference, layer.blob()).await?;
            found.extend(layer.attach(blob.into_bytes()));
        }
        Ok(found)
    }

    /// A manifest by tag or digest, `None` if the registry does not have it.
    async fn artifact_manifest(
        &self,
        image: &str,
        reference: &Reference,
        tag_or_digest: &str,
    ) -> Result<Option<Vec<u8>>, ResolveError> {
        let target = match tag_or_digest.parse::<Digest>() {
            Ok(d) => Reference { tag: None, digest: Some(d), ..reference.clone() },
            Err(_) => Reference { tag: Some(tag_or_digest.to_string()), digest: None, ..reference.clone() },
        };
        self.with_hosts(image, &target, |r| async move {
            match self.client.pull_manifest_raw(&r, &RegistryAuth::Anonymous, ACCEPT).await {
                Ok((bytes, _)) if bytes.len() as u64 <= MAX_ARTIFACT => Ok(Some(bytes.to_vec())),
                Ok(_) => Ok(None),
                Err(e) if is_not_found(&e) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// A small blob of a signature artifact, checked against its digest.
    async fn artifact_blob(
        &self,
        image: &str,
        reference: &Reference,
        blob: &crate::oci::Descriptor,
    ) -> Result<String, ResolveError> {
        let unsupported = |message: String| ResolveError::Unsupported { image: image.to_string(), message };
        if blob.size > MAX_ARTIFACT {
            return Err(unsupported(format!(
                "signature blob {} is {} bytes: too large for a signature",
                blob.digest, blob.size
            )));
        }
        let digest = blob.digest.to_string();
        let bytes = self
            .with_hosts(image, reference, |r| {
                let digest = digest.clone();
                async move {
                    let mut out = Vec::new();
                    self.client.pull_blob(&r, digest.as_str(), &mut out).await?;
                    Ok(out)
                }
            })
            .await?;
        if Digest::of(&bytes) != blob.digest {
            return Err(unsupported(format!("signature blob {} does not match its digest", blob.digest)));
        }
        String::from_utf8(bytes).map_err(|_| unsupported(format!("signature blob {} is not UTF-8 JSON", blob.digest)))
    }
}

pub(super) fn is_not_found(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) | OciDistributionError::ServerError { code: 404, .. } => {
            true
        }
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(e.code, OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::NotFound)
        }),
        _ => false,
    }
}
