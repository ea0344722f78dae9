//! What decides trust in an image, on either wing: cosign public keys
//! ([`key`]), the signature formats cosign attaches to an image
//! ([`cosign`]: sigstore bundles with a DSSE in-toto statement, and
//! simple-signing payloads), checked against a digest, and what a referrer
//! of an image is ([`referrer`]: signature, attestation, SBOM). Nothing here fetches
//! or writes: the build wing's `verify` fetches through the registry client;
//! the node wing reads what the partition carries.

pub mod cosign;
pub mod key;
pub mod referrer;

pub use key::PublicKey;
