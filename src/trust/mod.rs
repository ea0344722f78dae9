//! What decides trust in an image, on either wing: cosign public keys
//! ([`key`]) and the signature formats cosign attaches to an image
//! ([`cosign`]: sigstore bundles with a DSSE in-toto statement, and
//! simple-signing payloads), checked against a digest. Nothing here fetches
//! or writes: the build wing's `verify` fetches through the registry client;
//! the node wing reads what the partition carries.

pub mod cosign;
pub mod key;

pub use key::PublicKey;
