//! Fetching what refers to an image, to carry it in the partition:
//! signatures, attestations and SBOMs found through the referrers API (or
//! its tag schema, `sha256-<hex>`), and under cosign's older tags
//! `sha256-<hex>.sig`, `.att` and `.sbom`. Every manifest and blob lands in
//! the cache verified against its digest; what each is comes from
//! [`crate::trust::referrer::classify`]. Nothing here decides trust.
//!
//! The listing of each subject is kept in the cache
//! (`referrers/<subject hex>.json`) so that `--offline` carries the same.

use oci_client::secrets::RegistryAuth;
use serde::{Deserialize, Serialize};

use super::{Registries, ResolveError, ACCEPT};
use crate::build::cache::BlobCache;
use crate::build::manifest::Reference;
use crate::digest::Digest;
use crate::oci::Descriptor;
use crate::partition::index::{IndexedBlob, IndexedReferrer, ReferrerKind};
use crate::trust::referrer::{classify, key_hint, predicate_type};

/// Referrer manifests are small JSON documents; anything bigger is refused.
const MAX_MANIFEST: u64 = 4 << 20;
/// A sigstore bundle or DSSE envelope read to classify its referrer.
const MAX_STATEMENT: u64 = 4 << 20;
/// Media types a referrer's manifest may have.
const MANIFEST_TYPES: &[&str] = &[crate::oci::OCI_MANIFEST, crate::oci::DOCKER_MANIFEST, crate::oci::OCI_INDEX];

/// A referrer fetched into the cache: what `preseed.json` records, and the
/// descriptors of every blob the tarball must carry for it (its manifest first).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FetchedReferrer {
    /// Its entry in `preseed.json`.
    pub referrer: IndexedReferrer,
    /// Its manifest, then its config and layers.
    pub blobs: Vec<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArtifactManifest {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    artifact_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

impl Registries {
    /// Everything of `kinds` that refers to `subject` in `reference`'s
    /// repository, fetched into the cache (or, `offline`, the listing kept
    /// there by an earlier run). An image with none gives an empty list.
    pub async fn referrers(
        &self,
        image: &str,
        reference: &Reference,
        subject: &Digest,
        kinds: &[ReferrerKind],
        cache: &BlobCache,
        offline: bool,
    ) -> Result<Vec<FetchedReferrer>, ResolveError> {
        let not_cached = || ResolveError::NotCached {
            image: image.to_string(),
            digest: subject.clone(),
            cache: format!("{} (its referrers)", cache.root().display()),
        };
        let all: Vec<FetchedReferrer> = if offline {
            let bytes = cache.kept(crate::build::cache::REFERRERS, subject).ok_or_else(not_cached)?;
            serde_json::from_slice(&bytes).map_err(|_| not_cached())?
        } else {
            let all = self.fetch_referrers(image, reference, subject, cache).await?;
            // Best effort: only an --offline run needs it.
            let _ = cache.keep(crate::build::cache::REFERRERS, subject, &serde_json::to_vec(&all).unwrap_or_default());
            all
        };
        let mut wanted: Vec<FetchedReferrer> = all.into_iter().filter(|c| kinds.contains(&c.referrer.kind)).collect();
        for c in &wanted {
            for d in &c.blobs {
                if !cache.contains(&d.digest, d.size) {
                    if offline {
                        return Err(ResolveError::NotCached {
                            image: image.to_string(),
                            digest: d.digest.clone(),
                            cache: cache.root().display().to_string(),
                        });
                    }
                    self.fetch_blob(image, reference, d, cache, &|_| {}).await?;
                }
            }
        }
        wanted.sort_by(|a, b| {
            let key =
                |c: &FetchedReferrer| (c.referrer.kind, c.referrer.tag.clone(), c.referrer.manifest.digest.clone());
            key(a).cmp(&key(b))
        });
        Ok(wanted)
    }

    /// Every referrer of `subject` of a kind preseed knows, all kinds; the
    /// manifests are stored in the cache, the blobs only listed.
    async fn fetch_referrers(
        &self,
        image: &str,
        reference: &Reference,
        subject: &Digest,
        cache: &BlobCache,
    ) -> Result<Vec<FetchedReferrer>, ResolveError> {
        let pinned = reference.with_digest(subject.clone());
        let mut out = Vec::new();
        // The referrers API (oci-client falls back to the `sha256-<hex>` tag
        // on a 404); a registry that answers otherwise and has no such tag has none.
        let listed: Vec<(Digest, Option<String>)> = match self
            .with_hosts(image, &pinned, |r| async move { self.client.pull_referrers(&r, None).await })
            .await
        {
            Ok(index) => {
                index.manifests.into_iter().filter_map(|m| Some((m.digest.parse().ok()?, m.artifact_type))).collect()
            }
            Err(_) => match self.manifest_by(image, reference, &format!("sha256-{}", subject.hex())).await? {
                Some(bytes) => serde_json::from_slice::<crate::oci::Index>(&bytes)
                    .map(|i| i.manifests.into_iter().map(|m| (m.digest, None)).collect())
                    .unwrap_or_default(),
                None => Vec::new(),
            },
        };
        for (digest, artifact_type) in listed {
            let Some(bytes) = self.manifest_by(image, reference, &digest.to_string()).await? else { continue };
            if Digest::of(&bytes) != digest {
                continue;
            }
            if let Some(c) = self.carried(image, reference, subject, &bytes, artifact_type, None, cache).await? {
                out.push(c);
            }
        }
        // cosign's older scheme: one manifest per kind, under a tag.
        for suffix in ["sig", "att", "sbom"] {
            let tag = format!("sha256-{}.{suffix}", subject.hex());
            let Some(bytes) = self.manifest_by(image, reference, &tag).await? else { continue };
            if let Some(c) = self.carried(image, reference, subject, &bytes, None, Some(tag), cache).await? {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// One referrer manifest, classified; its manifest stored in the cache.
    #[allow(clippy::too_many_arguments)]
    async fn carried(
        &self,
        image: &str,
        reference: &Reference,
        subject: &Digest,
        bytes: &[u8],
        listed_type: Option<String>,
        tag: Option<String>,
        cache: &BlobCache,
    ) -> Result<Option<FetchedReferrer>, ResolveError> {
        let Ok(m) = serde_json::from_slice::<ArtifactManifest>(bytes) else { return Ok(None) };
        let media_type = m.media_type.clone().unwrap_or_else(|| crate::oci::OCI_MANIFEST.to_string());
        if !MANIFEST_TYPES.contains(&media_type.as_str()) {
            return Ok(None);
        }
        let artifact_type = listed_type
            .or(m.artifact_type.clone())
            .or_else(|| m.config.as_ref().map(|c| c.media_type.clone()).filter(|t| !t.contains("oci.empty")));
        let layer_types: Vec<&str> = m.layers.iter().map(|l| l.media_type.as_str()).collect();
        // The statement of a bundle or envelope: its first small layer.
        let first = m.layers.first().filter(|l| l.size <= MAX_STATEMENT).cloned();
        let mut statement_bytes = None;
        if let Some(l) = &first {
            if !cache.contains(&l.digest, l.size) {
                self.fetch_blob(image, reference, l, cache, &|_| {}).await?;
            }
            statement_bytes = cache.read_small(&l.digest).ok();
        }
        let Some((kind, predicates)) =
            classify(artifact_type.as_deref(), &layer_types, || statement_bytes.as_deref().and_then(predicate_type))
        else {
            return Ok(None);
        };
        let digest = Digest::of(bytes);
        if !cache.contains(&digest, bytes.len() as u64) {
            cache.put_bytes(bytes).map_err(|source| ResolveError::Cache { image: image.to_string(), source })?;
        }
        let manifest = Descriptor::new(&media_type, digest.clone(), bytes.len() as u64);
        let mut blobs = vec![manifest];
        let mut indexed = Vec::new();
        for d in m.config.iter().chain(&m.layers) {
            if blobs.iter().all(|b| b.digest != d.digest) {
                blobs.push(Descriptor::new(&d.media_type, d.digest.clone(), d.size));
                indexed.push(IndexedBlob { digest: d.digest.clone(), size: d.size });
            }
        }
        let referrer = IndexedReferrer {
            kind,
            subject: subject.clone(),
            manifest: IndexedBlob { digest, size: bytes.len() as u64 },
            media_type,
            artifact_type,
            tag,
            predicates,
            key: statement_bytes.as_deref().filter(|_| kind == ReferrerKind::Signature).and_then(key_hint),
            blobs: indexed,
        };
        Ok(Some(FetchedReferrer { referrer, blobs }))
    }

    /// A manifest by tag or digest (at most [`MAX_MANIFEST`] bytes), `None`
    /// if the registry does not have it.
    async fn manifest_by(
        &self,
        image: &str,
        reference: &Reference,
        tag_or_digest: &str,
    ) -> Result<Option<Vec<u8>>, ResolveError> {
        let target = match tag_or_digest.parse::<Digest>() {
            Ok(d) => Reference { tag: None, digest: Some(d), ..reference.clone() },
            Err(_) => Reference { tag: Some(tag_or_digest.to_string()), digest: None, ..reference.clone() },
        };
        let accept: Vec<&str> = ACCEPT.iter().copied().chain(MANIFEST_TYPES.iter().copied()).collect();
        let accept = &accept;
        self.with_hosts(image, &target, |r| async move {
            match self.client.pull_manifest_raw(&r, &RegistryAuth::Anonymous, accept).await {
                Ok((bytes, _)) if bytes.len() as u64 <= MAX_MANIFEST => Ok(Some(bytes.to_vec())),
                Ok(_) => Ok(None),
                Err(e) if super::signature::is_not_found(&e) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
    }
}
