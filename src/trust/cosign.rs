//! cosign's signatures of an image, and checking one against a digest and a
//! key. Accepted: what cosign writes with key-based signing and no
//! transparency log — a sigstore bundle whose DSSE envelope holds an in-toto
//! statement (predicate `https://sigstore.dev/cosign/sign/v1`) naming the
//! digest (cosign 3's default), and the older simple-signing payload whose
//! `docker-manifest-digest` names it. A signature counts only if it verifies
//! with the key *and* names this very digest; `docker-reference` is not
//! compared, so an image copied to a mirror keeps its signature (as with
//! `cosign verify`).

use std::sync::Arc;

use base64::Engine as _;
use serde::Deserialize;

use super::key::PublicKey;
use crate::digest::Digest;
use crate::oci::Descriptor;
use crate::partition::index::SignedBy;

/// Media type of a sigstore bundle (any version: the verifier reads it).
pub const SIGSTORE_BUNDLE_PREFIX: &str = "application/vnd.dev.sigstore.bundle";
/// Media type of cosign's simple-signing payload layers.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer annotation holding a simple-signing signature (base64 DER).
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// in-toto predicate type of `cosign sign` (not of `cosign attest`).
pub const COSIGN_SIGN_PREDICATE: &str = "https://sigstore.dev/cosign/sign/v1";
/// `critical.type` of a simple-signing payload.
const SIMPLE_SIGNING_TYPE: &str = "cosign container image signature";

/// One signature found attached to an image, not yet checked.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "format")]
pub enum Attached {
    /// A sigstore bundle (JSON), from the referrers of the image.
    SigstoreBundle {
        /// The bundle document as served.
        bundle: String,
    },
    /// A layer of the `.sig` tag's manifest.
    SimpleSigning {
        /// The payload blob, as served.
        payload: String,
        /// The `dev.cosignproject.cosign/signature` annotation (base64).
        signature: String,
    },
}

impl Attached {
    /// `sigstore-bundle` or `simple-signing`: how reports name the format.
    pub fn format(&self) -> &'static str {
        match self {
            Attached::SigstoreBundle { .. } => "sigstore-bundle",
            Attached::SimpleSigning { .. } => "simple-signing",
        }
    }
}

/// A signature layer of a signature manifest, still to be read.
#[derive(Clone, Debug, PartialEq)]
pub enum SignatureLayer {
    /// A sigstore bundle: read the blob, it is the whole signature.
    Bundle(Descriptor),
    /// A simple-signing payload: read the blob; the signature is here.
    SimpleSigning {
        /// The payload blob.
        payload: Descriptor,
        /// Its `dev.cosignproject.cosign/signature` annotation (base64).
        signature: String,
    },
}

impl SignatureLayer {
    /// The blob to read.
    pub fn blob(&self) -> &Descriptor {
        match self {
            SignatureLayer::Bundle(d) | SignatureLayer::SimpleSigning { payload: d, .. } => d,
        }
    }

    /// The signature, given the blob's bytes (`None`: not UTF-8).
    pub fn attach(self, blob: Vec<u8>) -> Option<Attached> {
        let text = String::from_utf8(blob).ok()?;
        Some(match self {
            SignatureLayer::Bundle(_) => Attached::SigstoreBundle { bundle: text },
            SignatureLayer::SimpleSigning { signature, .. } => Attached::SimpleSigning { payload: text, signature },
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SignatureManifest {
    #[serde(default)]
    artifact_type: Option<String>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// The signature layers of a manifest cosign wrote: sigstore bundles (by
/// layer media type or the manifest's `artifactType`), and simple-signing
/// payloads that carry their signature annotation. Anything else (not JSON,
/// an attestation) has none. Shared by the build wing, which fetches the
/// blobs from the registry, and the node wing, which reads them from the
/// partition.
pub fn signature_layers(manifest: &[u8]) -> Vec<SignatureLayer> {
    let Ok(m) = serde_json::from_slice::<SignatureManifest>(manifest) else { return Vec::new() };
    let is_bundle = |t: &str| t.starts_with(SIGSTORE_BUNDLE_PREFIX);
    let bundle_artifact = m.artifact_type.as_deref().is_some_and(is_bundle);
    m.layers
        .into_iter()
        .filter_map(|l| {
            if is_bundle(&l.media_type) || bundle_artifact {
                Some(SignatureLayer::Bundle(l))
            } else if l.media_type == SIMPLE_SIGNING {
                let signature = l.annotations.get(SIGNATURE_ANNOTATION)?.clone();
                Some(SignatureLayer::SimpleSigning { payload: l, signature })
            } else {
                None
            }
        })
        .collect()
}

/// Why an image is not signed by any of the keys.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unsigned {
    /// Nothing is attached at all.
    #[error(
        "no signature found (no sigstore bundle among its referrers or under tag sha256-{hex}, no tag sha256-{hex}.sig)",
        hex = .digest.hex()
    )]
    Nothing {
        /// The image's digest.
        digest: Digest,
    },
    /// Signatures exist, but none counts.
    #[error(
        "found {found} signature(s), none valid: {}",
        .findings.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    NoneValid {
        /// How many were attached.
        found: usize,
        /// Why each (key, signature) pair did not count, duplicates removed.
        findings: Vec<Finding>,
    },
}

/// Why one signature did not count for one key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{format}: {problem}")]
pub struct Finding {
    /// The signature's format ([`Attached::format`]).
    pub format: &'static str,
    /// What is wrong.
    pub problem: Problem,
}

/// What is wrong with a signature, for one key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The bundle is not JSON of a sigstore bundle.
    #[error("not a sigstore bundle: {0}")]
    NotABundle(String),
    /// A message-signature bundle.
    #[error("no DSSE envelope (a message-signature bundle signs a blob, not an image)")]
    NoEnvelope,
    /// The envelope's payload is not base64.
    #[error("payload is not base64: {0}")]
    PayloadNotBase64(String),
    /// The simple-signing signature is not base64.
    #[error("signature is not base64: {0}")]
    SignatureNotBase64(String),
    /// Signed by another key, or altered since.
    #[error("signature does not verify with {key} (signed by another key, or altered)")]
    DoesNotVerify {
        /// The key, as named.
        key: String,
    },
    /// A valid signature over something that is not an in-toto statement.
    #[error("validly signed by {key}, but not an in-toto statement: {error}")]
    NotAStatement {
        /// The key.
        key: String,
        /// The parse error.
        error: String,
    },
    /// An attestation (`cosign attest`), not a signature.
    #[error("validly signed by {key}, but an attestation ({predicate}), not a signature")]
    Attestation {
        /// The key.
        key: String,
        /// Its predicate type.
        predicate: String,
    },
    /// A valid signature over something that is not a simple-signing payload.
    #[error("validly signed by {key}, but not a simple-signing payload: {error}")]
    NotSimpleSigning {
        /// The key.
        key: String,
        /// The parse error.
        error: String,
    },
    /// A simple-signing payload of another type.
    #[error("validly signed by {key}, but of type {kind:?}")]
    WrongType {
        /// The key.
        key: String,
        /// The type found.
        kind: String,
    },
    /// A valid signature of another image.
    #[error("validly signed by {key}, but for {signed}, not this digest")]
    OtherDigest {
        /// The key.
        key: String,
        /// The digest(s) it signs.
        signed: String,
    },
}

/// The first key (in policy order) with a valid signature for `digest`, or
/// why there is none.
pub fn check(digest: &Digest, attached: &[Attached], keys: &[Arc<PublicKey>]) -> Result<SignedBy, Unsigned> {
    if attached.is_empty() {
        return Err(Unsigned::Nothing { digest: digest.clone() });
    }
    let mut findings = Vec::new();
    for key in keys {
        for a in attached {
            match check_one(digest, a, key) {
                Ok(()) => {
                    return Ok(SignedBy {
                        key: key.name.clone(),
                        key_sha256: key.fingerprint.clone(),
                        format: a.format().to_string(),
                    })
                }
                Err(problem) => findings.push(Finding { format: a.format(), problem }),
            }
        }
    }
    findings.dedup();
    Err(Unsigned::NoneValid { found: attached.len(), findings })
}

/// Checks one signature with one key.
fn check_one(digest: &Digest, a: &Attached, key: &PublicKey) -> Result<(), Problem> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.decode(s.trim());
    let name = || key.name.clone();
    let signed_digest = match a {
        Attached::SigstoreBundle { bundle } => {
            let bundle: Bundle = serde_json::from_str(bundle).map_err(|e| Problem::NotABundle(e.to_string()))?;
            let env = bundle.dsse_envelope.ok_or(Problem::NoEnvelope)?;
            let payload = b64(&env.payload).map_err(|e| Problem::PayloadNotBase64(e.to_string()))?;
            let pae = pae(&env.payload_type, &payload);
            let valid = env.signatures.iter().any(|s| b64(&s.sig).is_ok_and(|sig| key.verifies(&pae, &sig)));
            if !valid {
                return Err(Problem::DoesNotVerify { key: name() });
            }
            let statement: Statement = serde_json::from_slice(&payload)
                .map_err(|e| Problem::NotAStatement { key: name(), error: e.to_string() })?;
            if statement.predicate_type != COSIGN_SIGN_PREDICATE {
                return Err(Problem::Attestation { key: name(), predicate: statement.predicate_type });
            }
            let digests: Vec<String> = statement
                .subject
                .iter()
                .filter_map(|s| s.digest.get("sha256").map(|h| format!("sha256:{h}")))
                .collect();
            if digests.iter().any(|d| d == &digest.to_string()) {
                return Ok(());
            }
            digests.join(", ")
        }
        Attached::SimpleSigning { payload, signature } => {
            let sig = b64(signature).map_err(|e| Problem::SignatureNotBase64(e.to_string()))?;
            if !key.verifies(payload.as_bytes(), &sig) {
                return Err(Problem::DoesNotVerify { key: name() });
            }
            let p: SimpleSigning = serde_json::from_str(payload)
                .map_err(|e| Problem::NotSimpleSigning { key: name(), error: e.to_string() })?;
            if p.critical.kind != SIMPLE_SIGNING_TYPE {
                return Err(Problem::WrongType { key: name(), kind: p.critical.kind });
            }
            if p.critical.image.docker_manifest_digest == digest.to_string() {
                return Ok(());
            }
            p.critical.image.docker_manifest_digest
        }
    };
    Err(Problem::OtherDigest { key: name(), signed: signed_digest })
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
        let err = check(&a, &[simple()], &key()).expect_err("B's signature on A").to_string();
        assert!(err.contains(&format!("validly signed by keys/release.pub, but for {B}")), "{err}");
        let altered =
            Attached::SimpleSigning { payload: PAYLOAD_B.replace("0b26", "7561"), signature: SIGNATURE_B.into() };
        let err = check(&a, &[altered], &key()).expect_err("altered payload").to_string();
        assert!(err.contains("does not verify with keys/release.pub"), "{err}");
        let err = check(&a, &[], &key()).expect_err("nothing").to_string();
        assert!(err.contains("no signature found"), "{err}");
    }
}
