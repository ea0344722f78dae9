//! What a referrer of an image is — a signature, an attestation or an SBOM —
//! told from its artifact and layer media types and, for a sigstore bundle
//! or a DSSE envelope, from the in-toto statement it carries. The build wing
//! classifies what it fetches with this; the node wing reads the verdict
//! from `preseed.json`.

use base64::Engine as _;
use serde::Deserialize;

use super::cosign::{COSIGN_SIGN_PREDICATE, SIGSTORE_BUNDLE_PREFIX, SIMPLE_SIGNING};
use crate::partition::index::ReferrerKind;

/// SBOM documents, by media type.
pub const SBOM_TYPES: &[&str] = &[
    "application/spdx+json",
    "text/spdx",
    "text/spdx+json",
    "application/vnd.cyclonedx+json",
    "application/vnd.cyclonedx+xml",
    "application/vnd.syft+json",
];
/// An in-toto statement (BuildKit attestations, `cosign attest` layers).
pub const IN_TOTO: &str = "application/vnd.in-toto+json";
/// A DSSE envelope (cosign's `.att` tag layers).
pub const DSSE: &str = "application/vnd.dsse.envelope.v1+json";

/// What a referrer is, from its types: `artifact_type` (the descriptor's or
/// the manifest's) and its layers' media types; `statement` gives the
/// predicate type of a sigstore bundle or DSSE envelope, when its bytes are
/// at hand. `None`: not something preseed carries.
pub fn classify(
    artifact_type: Option<&str>,
    layers: &[&str],
    statement: impl Fn() -> Option<String>,
) -> Option<(ReferrerKind, Vec<String>)> {
    let types: Vec<&str> = artifact_type.into_iter().chain(layers.iter().copied()).collect();
    if types.iter().any(|t| t.starts_with(SIGSTORE_BUNDLE_PREFIX) || *t == DSSE) {
        return match statement()? {
            p if p == COSIGN_SIGN_PREDICATE => Some((ReferrerKind::Signature, Vec::new())),
            p => Some((ReferrerKind::Attestation, vec![p])),
        };
    }
    if types.contains(&SIMPLE_SIGNING) {
        return Some((ReferrerKind::Signature, Vec::new()));
    }
    let sboms: Vec<String> = types.iter().filter(|t| SBOM_TYPES.contains(t)).map(|t| t.to_string()).collect();
    if !sboms.is_empty() {
        let mut sboms = sboms;
        sboms.dedup();
        return Some((ReferrerKind::Sbom, sboms));
    }
    if types.contains(&IN_TOTO) {
        return Some((ReferrerKind::Attestation, statement().into_iter().collect()));
    }
    None
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    payload: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Bundle {
    dsse_envelope: Option<Envelope>,
    #[serde(default)]
    verification_material: Option<Material>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Material {
    public_key: Option<Hint>,
}

#[derive(Deserialize)]
struct Hint {
    hint: String,
}

/// The key a sigstore bundle names (its `publicKey.hint`: base64 of the
/// sha256 of the key's DER, which is how [`super::key::PublicKey`]
/// fingerprints keys). Only a hint: the signature is not checked here.
pub fn key_hint(bundle: &[u8]) -> Option<crate::digest::Digest> {
    let b: Bundle = serde_json::from_slice(bundle).ok()?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b.verification_material?.public_key?.hint).ok()?;
    (raw.len() == 32).then(|| format!("sha256:{}", hex::encode(raw)).parse().ok()).flatten()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Statement {
    predicate_type: String,
}

/// The in-toto predicate type inside a sigstore bundle, a bare DSSE
/// envelope, or an in-toto statement itself.
pub fn predicate_type(bytes: &[u8]) -> Option<String> {
    if let Ok(s) = serde_json::from_slice::<Statement>(bytes) {
        return Some(s.predicate_type);
    }
    let payload = match serde_json::from_slice::<Bundle>(bytes) {
        Ok(Bundle { dsse_envelope: Some(env), .. }) => env.payload,
        _ => serde_json::from_slice::<Envelope>(bytes).ok()?.payload,
    };
    let payload = base64::engine::general_purpose::STANDARD.decode(payload.trim()).ok()?;
    serde_json::from_slice::<Statement>(&payload).ok().map(|s| s.predicate_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_from_types_and_statements() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let statement = |p: &str| format!(r#"{{"_type":"https://in-toto.io/Statement/v1","predicateType":"{p}"}}"#);
        let bundle =
            |p: &str| format!(r#"{{"dsseEnvelope":{{"payload":"{}","payloadType":"x"}}}}"#, b64(&statement(p)));
        let sign = bundle(COSIGN_SIGN_PREDICATE);
        let slsa = bundle("https://slsa.dev/provenance/v1");
        let t = "application/vnd.dev.sigstore.bundle.v0.3+json";
        assert_eq!(classify(Some(t), &[], || predicate_type(sign.as_bytes())), Some((ReferrerKind::Signature, vec![])));
        assert_eq!(
            classify(Some(t), &[], || predicate_type(slsa.as_bytes())),
            Some((ReferrerKind::Attestation, vec!["https://slsa.dev/provenance/v1".into()]))
        );
        let envelope =
            format!(r#"{{"payload":"{}","payloadType":"application/vnd.in-toto+json"}}"#, b64(&statement("p")));
        assert_eq!(
            classify(None, &[DSSE], || predicate_type(envelope.as_bytes())).map(|k| k.0),
            Some(ReferrerKind::Attestation)
        );
        assert_eq!(classify(None, &[SIMPLE_SIGNING], || None).map(|k| k.0), Some(ReferrerKind::Signature));
        assert_eq!(
            classify(Some("application/spdx+json"), &["application/spdx+json"], || None),
            Some((ReferrerKind::Sbom, vec!["application/spdx+json".into()]))
        );
        assert_eq!(classify(Some("application/vnd.example+json"), &[], || None), None);
        // A message-signature bundle (no DSSE): not an image's signature.
        assert_eq!(classify(Some(t), &[], || predicate_type(b"{}")), None);
    }
}
