//! The `[verify]` policy: before anything is written, every covered image's
//! pinned digest must carry a valid cosign signature by one of its keys.
//!
//! Accepted: what cosign writes with key-based signing and no transparency
//! log — a sigstore bundle whose DSSE envelope holds an in-toto statement
//! (predicate `https://sigstore.dev/cosign/sign/v1`) naming the digest
//! (cosign 3's default), and the older simple-signing payload whose
//! `docker-manifest-digest` names it. The signature must verify with the key
//! *and* name this very digest; `docker-reference` is not compared, so an
//! image copied to a mirror keeps its signature (as with `cosign verify`).
//!
//! Architecture invariant: this module decides trust and never writes to the
//! output; what it fetches comes through [`crate::resolve`] (same mirrors,
//! credentials, CAs), and what verified is kept in the cache only so an
//! `--offline` run can check the same signatures again.

pub mod key;

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use serde::Deserialize;

use crate::digest::Digest;
use crate::fetch::cache::BlobCache;
use crate::manifest::ImageEntry;
pub use crate::partition::index::SignedBy;
use crate::resolve::signature::Attached;
use crate::resolve::{Registries, ResolveError};
pub use key::PublicKey;

/// in-toto predicate type of `cosign sign` (not of `cosign attest`).
pub const COSIGN_SIGN_PREDICATE: &str = "https://sigstore.dev/cosign/sign/v1";
/// `critical.type` of a simple-signing payload.
const SIMPLE_SIGNING_TYPE: &str = "cosign container image signature";

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
        found: String,
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
    let kept = cache.root().join("signatures").join(format!("{}.json", digest.hex()));
    let attached: Vec<Attached> = if offline {
        let bytes = std::fs::read(&kept).map_err(|_| VerifyError::NotCached {
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
    match check(digest, &attached, &entry.verify) {
        Ok(signed) => {
            if !offline {
                // Best effort: only an --offline run needs it, and it checks again.
                let _ = std::fs::create_dir_all(kept.parent().expect("has a parent"))
                    .and_then(|()| std::fs::write(&kept, serde_json::to_vec(&attached).unwrap_or_default()));
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

/// The first key (in policy order) with a valid signature for `digest`, or
/// what was found instead.
pub fn check(digest: &Digest, attached: &[Attached], keys: &[Arc<PublicKey>]) -> Result<SignedBy, String> {
    if attached.is_empty() {
        return Err(format!(
            "no signature found (no sigstore bundle among its referrers or under tag sha256-{hex}, no tag sha256-{hex}.sig)",
            hex = digest.hex()
        ));
    }
    let mut findings = Vec::new();
    for key in keys {
        for a in attached {
            match check_one(digest, a, key) {
                Ok(format) => {
                    return Ok(SignedBy {
                        key: key.name.clone(),
                        key_sha256: key.fingerprint.clone(),
                        format: format.to_string(),
                    })
                }
                Err(f) => findings.push(f),
            }
        }
    }
    findings.dedup();
    Err(format!("found {} signature(s), none valid: {}", attached.len(), findings.join("; ")))
}

fn format_name(a: &Attached) -> &'static str {
    match a {
        Attached::SigstoreBundle { .. } => "sigstore-bundle",
        Attached::SimpleSigning { .. } => "simple-signing",
    }
}

/// Checks one signature with one key; `Err` says why it does not count.
fn check_one(digest: &Digest, a: &Attached, key: &PublicKey) -> Result<&'static str, String> {
    let format = format_name(a);
    let bad = |what: String| format!("{format}: {what}");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.decode(s.trim());
    let signed_digest = match a {
        Attached::SigstoreBundle { bundle } => {
            let bundle: Bundle =
                serde_json::from_str(bundle).map_err(|e| bad(format!("not a sigstore bundle: {e}")))?;
            let env = bundle.dsse_envelope.ok_or_else(|| {
                bad("no DSSE envelope (a message-signature bundle signs a blob, not an image)".into())
            })?;
            let payload = b64(&env.payload).map_err(|e| bad(format!("payload is not base64: {e}")))?;
            let pae = pae(&env.payload_type, &payload);
            let valid = env.signatures.iter().any(|s| b64(&s.sig).is_ok_and(|sig| key.verifies(&pae, &sig)));
            if !valid {
                return Err(bad(format!(
                    "signature does not verify with {} (signed by another key, or altered)",
                    key.name
                )));
            }
            let statement: Statement = serde_json::from_slice(&payload)
                .map_err(|e| bad(format!("validly signed by {}, but not an in-toto statement: {e}", key.name)))?;
            if statement.predicate_type != COSIGN_SIGN_PREDICATE {
                return Err(bad(format!(
                    "validly signed by {}, but an attestation ({}), not a signature",
                    key.name, statement.predicate_type
                )));
            }
            let digests: Vec<String> = statement
                .subject
                .iter()
                .filter_map(|s| s.digest.get("sha256").map(|h| format!("sha256:{h}")))
                .collect();
            if digests.iter().any(|d| d == &digest.to_string()) {
                return Ok(format);
            }
            digests.join(", ")
        }
        Attached::SimpleSigning { payload, signature } => {
            let sig = b64(signature).map_err(|e| bad(format!("signature is not base64: {e}")))?;
            if !key.verifies(payload.as_bytes(), &sig) {
                return Err(bad(format!(
                    "signature does not verify with {} (signed by another key, or altered)",
                    key.name
                )));
            }
            let p: SimpleSigning = serde_json::from_str(payload)
                .map_err(|e| bad(format!("validly signed by {}, but not a simple-signing payload: {e}", key.name)))?;
            if p.critical.kind != SIMPLE_SIGNING_TYPE {
                return Err(bad(format!("validly signed by {}, but of type {:?}", key.name, p.critical.kind)));
            }
            if p.critical.image.docker_manifest_digest == digest.to_string() {
                return Ok(format);
            }
            p.critical.image.docker_manifest_digest
        }
    };
    Err(bad(format!("validly signed by {}, but for {signed_digest}, not this digest", key.name)))
}

/// DSSE's pre-authentication encoding: what the envelope's signature signs.
fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {} {} ", payload_type.len(), payload_type, payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Bundle {
    #[serde(default)]
    dsse_envelope: Option<Envelope>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    payload: String,
    payload_type: String,
    #[serde(default)]
    signatures: Vec<EnvelopeSignature>,
}

#[derive(Deserialize)]
struct EnvelopeSignature {
    sig: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Statement {
    #[serde(default)]
    subject: Vec<Subject>,
    #[serde(default)]
    predicate_type: String,
}

#[derive(Deserialize)]
struct Subject {
    #[serde(default)]
    digest: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct SimpleSigning {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    #[serde(rename = "type")]
    kind: String,
    image: CriticalImage,
}

#[derive(Deserialize)]
struct CriticalImage {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    // Written by cosign 3.1.1 (`cosign sign --key`, no transparency log) for
    // two images of a test registry, and the public key that signed both.
    const KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE8LOsuqTwF+qvKP0E+oBGoLQyLcgf
HaMj7JofjGymMU+ePrYY1k6pm+6RoG8IG7MdH58MZnAGmeriyYQ4YAOAHg==
-----END PUBLIC KEY-----
";
    const A: &str = "sha256:756132e841768d88d41065156a55fc30aee7c8c521c17d78b7ca9695f79bd924";
    const BUNDLE_A: &str = r#"{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","verificationMaterial":{"publicKey":{"hint":"LX6F+Mqh0X3upRz0BKniv3JMy3wMB0KGs7cmOFFzJbk="}},"dsseEnvelope":{"payload":"eyJfdHlwZSI6Imh0dHBzOi8vaW4tdG90by5pby9TdGF0ZW1lbnQvdjEiLCJzdWJqZWN0IjpbeyJkaWdlc3QiOnsic2hhMjU2IjoiNzU2MTMyZTg0MTc2OGQ4OGQ0MTA2NTE1NmE1NWZjMzBhZWU3YzhjNTIxYzE3ZDc4YjdjYTk2OTVmNzliZDkyNCJ9LCJhbm5vdGF0aW9ucyI6e319XSwicHJlZGljYXRlVHlwZSI6Imh0dHBzOi8vc2lnc3RvcmUuZGV2L2Nvc2lnbi9zaWduL3YxIiwicHJlZGljYXRlIjp7fX0=","payloadType":"application/vnd.in-toto+json","signatures":[{"sig":"MEUCIBcJifwfCIjdUQnEk+PCUAaSJZjKQLuP9ph9UGDVITvgAiEAoR70/XKREGu7drZBRQEE9bd+qfUB4GfjPLFFW6kdDR8="}]}}"#;
    const B: &str = "sha256:0b26da74789630c190eb6e410f1a2e410e9fea2db5d28dfd2f03bed34c724f99";
    const PAYLOAD_B: &str = r#"{"critical":{"identity":{"docker-reference":"127.0.0.1:45123/demo"},"image":{"docker-manifest-digest":"sha256:0b26da74789630c190eb6e410f1a2e410e9fea2db5d28dfd2f03bed34c724f99"},"type":"cosign container image signature"},"optional":null}"#;
    const SIGNATURE_B: &str =
        "MEYCIQCkj2Sh/Oedn5kGqjtMA/khlUxsCKT67CzjfkoWnnEqPQIhAKTrcQSKeYT1hFyk6CkVW7krK2daQ3FjubTlU8tjYoK9";

    fn key() -> Vec<Arc<PublicKey>> {
        vec![Arc::new(PublicKey::from_pem("keys/release.pub", Path::new("keys/release.pub"), KEY).expect("key"))]
    }

    fn bundle() -> Attached {
        Attached::SigstoreBundle { bundle: BUNDLE_A.into() }
    }

    fn simple() -> Attached {
        Attached::SimpleSigning { payload: PAYLOAD_B.into(), signature: SIGNATURE_B.into() }
    }

    #[test]
    fn both_cosign_formats_verify() {
        let a: Digest = A.parse().expect("digest");
        let b: Digest = B.parse().expect("digest");
        let signed = check(&a, &[simple(), bundle()], &key()).expect("bundle verifies");
        assert_eq!((signed.key.as_str(), signed.format.as_str()), ("keys/release.pub", "sigstore-bundle"));
        // The hint cosign writes is the same fingerprint, base64.
        assert!(BUNDLE_A.contains("LX6F+Mqh0X3upRz0BKniv3JMy3wMB0KGs7cmOFFzJbk="));
        assert!(signed.key_sha256.hex().starts_with("2d7e85f8"));
        let signed = check(&b, &[bundle(), simple()], &key()).expect("simple signing verifies");
        assert_eq!(signed.format, "simple-signing");
    }

    #[test]
    fn signatures_for_another_digest_or_altered_do_not_count() {
        let a: Digest = A.parse().expect("digest");
        let err = check(&a, &[simple()], &key()).expect_err("B's signature on A");
        assert!(err.contains(&format!("validly signed by keys/release.pub, but for {B}")), "{err}");
        let altered =
            Attached::SimpleSigning { payload: PAYLOAD_B.replace("0b26", "7561"), signature: SIGNATURE_B.into() };
        let err = check(&a, &[altered], &key()).expect_err("altered payload");
        assert!(err.contains("does not verify with keys/release.pub"), "{err}");
        let err = check(&a, &[], &key()).expect_err("nothing");
        assert!(err.contains("no signature found"), "{err}");
    }
}
