//! cosign public keys: PEM `PUBLIC KEY` (SubjectPublicKeyInfo) files, ECDSA
//! P-256 — what `cosign generate-key-pair` writes.
//!
//! The crypto is aws-lc-rs, already in the build as rustls's provider (the
//! registry client's TLS): checking signatures adds no crate to compile.

use std::fmt;
use std::path::{Path, PathBuf};

use aws_lc_rs::signature::{ParsedPublicKey, ECDSA_P256_SHA256_ASN1};
use base64::Engine as _;

use crate::digest::Digest;

/// Why a public key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read.
    #[error("public key {name} ({}): {source}; key paths are relative to the directory of the file naming them", .path.display())]
    Read {
        /// The key as named.
        name: String,
        /// Where it was looked for.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a key preseed can use.
    #[error(
        "public key {name} ({}): {problem}; expected a PEM \"PUBLIC KEY\" (ECDSA P-256) as `cosign generate-key-pair` \
         writes it to cosign.pub",
        .path.display()
    )]
    Invalid {
        /// The key as named.
        name: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// A trusted public key, as named in bundles.toml.
pub struct PublicKey {
    /// The path as written in bundles.toml (relative to its directory):
    /// what messages and `preseed.json` call the key.
    pub name: String,
    /// Where it was read from.
    pub path: PathBuf,
    /// sha256 of the key's DER SubjectPublicKeyInfo, to tell keys apart.
    pub fingerprint: Digest,
    key: ParsedPublicKey,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({} {})", self.name, self.fingerprint)
    }
}

impl PublicKey {
    /// Reads a PEM public key file.
    pub fn load(name: &str, path: &Path) -> Result<PublicKey, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            name: name.to_string(),
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_pem(name, path, &text)
    }

    /// Parses a PEM `PUBLIC KEY` block.
    pub fn from_pem(name: &str, path: &Path, text: &str) -> Result<PublicKey, KeyError> {
        let bad = |problem: String| KeyError::Invalid { name: name.to_string(), path: path.to_path_buf(), problem };
        let begin = "-----BEGIN PUBLIC KEY-----";
        let end = "-----END PUBLIC KEY-----";
        let start = text.find(begin).ok_or_else(|| bad(format!("no \"{begin}\" line")))? + begin.len();
        let stop = text[start..].find(end).ok_or_else(|| bad(format!("no \"{end}\" line")))? + start;
        let b64: String = text[start..stop].chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let der = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| bad(format!("bad base64: {e}")))?;
        let key = ParsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &der)
            .map_err(|e| bad(format!("not an ECDSA P-256 public key ({e}); other key types are not supported")))?;
        Ok(PublicKey { name: name.to_string(), path: path.to_path_buf(), fingerprint: Digest::of(&der), key })
    }

    /// Whether `signature` (ASN.1 DER ECDSA, as cosign writes it) signs `message`.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        self.key.verify_sig(message, signature).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Written by `cosign generate-key-pair` (cosign 3.1.1).
    const PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE8LOsuqTwF+qvKP0E+oBGoLQyLcgf
HaMj7JofjGymMU+ePrYY1k6pm+6RoG8IG7MdH58MZnAGmeriyYQ4YAOAHg==
-----END PUBLIC KEY-----
";

    #[test]
    fn parses_cosign_keys_and_refuses_others() {
        let p = Path::new("keys/a.pub");
        let key = PublicKey::from_pem("keys/a.pub", p, PEM).expect("cosign key parses");
        assert!(!key.verifies(b"x", b"not DER"));
        let err = PublicKey::from_pem("keys/a.pub", p, "hello").expect_err("not PEM").to_string();
        assert!(err.contains("no \"-----BEGIN PUBLIC KEY-----\" line"), "{err}");
        let short = PEM.replace("MFkw", "MFkx");
        let err = PublicKey::from_pem("keys/a.pub", p, &short).expect_err("corrupt").to_string();
        assert!(err.contains("not an ECDSA P-256 public key"), "{err}");
    }
}
