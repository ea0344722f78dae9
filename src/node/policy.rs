//! The node's signature policy: which images must carry a cosign signature,
//! and by which keys, checked offline against what the partition carries
//! (`[partition] referrers` in bundles.toml puts each image's signatures in
//! its tarball and lists them in `preseed.json`).
//!
//! ```toml
//! [[require]]
//! images = ["registry.example.com/*"]   # `*` matches anything, `/` too
//! keys = ["keys/release.pub"]           # relative to this file's directory
//! ```
//!
//! An image matched by a rule (any of its names) needs, for every rule that
//! matches it, a signature of its pinned digest by one of that rule's keys;
//! images no rule matches pass. One that fails moves from the listing's
//! images to its refused entries, so `load`, `place` and `serve` report it
//! as they report any unusable entry: named, not imported or served, the
//! rest going on. This complements dm-verity, which proves the partition is
//! the one built: the policy proves each image is one its owners signed,
//! whoever built the partition.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::digest::Digest;
use crate::node::read::archive::Archive;
use crate::node::read::source::{Listing, Refused, SourceImage};
use crate::partition::index::{ReferrerKind, SignedBy};
use crate::trust::cosign::{self, Attached};
use crate::trust::PublicKey;

/// Largest signature manifest or signature blob read from a tarball.
const MAX_SIGNATURE: u64 = 1 << 20;

/// Why the policy file cannot be used (the command stops: a node told to
/// check signatures must not go on without checking them).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file cannot be read.
    #[error("policy {}: {source}", .path.display())]
    Read {
        /// The policy file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// It is not a policy.
    #[error("policy {}: {message}", .path.display())]
    Invalid {
        /// The policy file.
        path: PathBuf,
        /// What is wrong, with its line when known.
        message: String,
    },
    /// A key cannot be used.
    #[error("policy {}: {source}", .path.display())]
    Key {
        /// The policy file.
        path: PathBuf,
        /// The key's problem.
        source: crate::trust::key::KeyError,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    require: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    images: Vec<String>,
    keys: Vec<String>,
}

/// One `[[require]]` rule.
#[derive(Debug)]
struct Rule {
    images: Vec<String>,
    keys: Vec<Arc<PublicKey>>,
}

/// A policy, its keys read.
#[derive(Debug)]
pub struct Policy {
    path: PathBuf,
    rules: Vec<Rule>,
}

impl Policy {
    /// Reads the policy file and every key it names.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read { path: path.into(), source })?;
        Self::parse(path, &text)
    }

    /// [`Policy::load`] of text already read (`path` names it, and key paths
    /// are relative to its directory).
    pub fn parse(path: &Path, text: &str) -> Result<Policy, PolicyError> {
        let invalid = |message: String| PolicyError::Invalid { path: path.into(), message };
        let file: PolicyFile = toml::from_str(text).map_err(|e| invalid(e.to_string().trim_end().to_string()))?;
        if file.require.is_empty() {
            return Err(invalid(
                "no [[require]] rule: a policy that requires nothing checks nothing (remove --policy instead)".into(),
            ));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut rules = Vec::new();
        for (i, r) in file.require.into_iter().enumerate() {
            if r.images.is_empty() || r.images.iter().any(String::is_empty) {
                return Err(invalid(format!("[[require]] #{}: `images` needs at least one non-empty pattern", i + 1)));
            }
            if r.keys.is_empty() {
                return Err(invalid(format!("[[require]] #{}: `keys` needs at least one public key file", i + 1)));
            }
            let keys = r
                .keys
                .iter()
                .map(|k| PublicKey::load(k, &dir.join(k)).map(Arc::new))
                .collect::<Result<_, _>>()
                .map_err(|source| PolicyError::Key { path: path.into(), source })?;
            rules.push(Rule { images: r.images, keys });
        }
        Ok(Policy { path: path.into(), rules })
    }

    /// Checks every image of `listing`; those that fail join its refused
    /// entries. Returns, per image that passed a rule, the keys that signed
    /// it (`(tarball, signed by)`), for the report.
    pub fn screen(&self, listing: &mut Listing) -> Vec<(String, SignedBy)> {
        let mut passed = Vec::new();
        let mut kept = Vec::new();
        for img in std::mem::take(&mut listing.images) {
            match self.check(img.clone()) {
                Ok(signed) => {
                    passed.extend(signed.into_iter().map(|s| (img.rel.clone(), s)));
                    kept.push(img);
                }
                Err(why) => listing.refused.push(Refused {
                    index: self.path.clone(),
                    namespace: img.namespace.clone(),
                    rel: img.rel.clone(),
                    image: img.names.first().cloned().unwrap_or_else(|| img.rel.clone()),
                    names: img.names.clone(),
                    boot: img.boot,
                    why,
                }),
            }
        }
        listing.images = kept;
        passed
    }

    /// The signatures `img` needs, checked: one per matching rule.
    fn check(&self, img: SourceImage) -> Result<Vec<SignedBy>, String> {
        let rules: Vec<(usize, &Rule)> = self
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| img.names.iter().any(|n| r.images.iter().any(|p| glob(p, n))))
            .collect();
        if rules.is_empty() {
            return Ok(Vec::new());
        }
        let unsigned = |why: String| format!("the policy requires a signature, but {why}");
        let Some(digest) = &img.digest else {
            return Err(unsigned("no preseed.json pins its digest (a policy checks partitions preseed built)".into()));
        };
        let attached = carried_signatures(&img, digest).map_err(unsigned)?;
        if attached.is_empty() {
            return Err(unsigned(format!(
                "the partition carries no signature of {digest} (bundle it with \"signatures\" in `[partition] \
                 referrers`, from a registry where the image is signed)"
            )));
        }
        let mut signed = Vec::new();
        for (i, rule) in rules {
            match cosign::check(digest, &attached, &rule.keys) {
                Ok(by) => signed.push(by),
                Err(e) => {
                    let keys: Vec<&str> = rule.keys.iter().map(|k| k.name.as_str()).collect();
                    return Err(format!(
                        "not signed as the policy requires ([[require]] #{} wants a signature of {digest} by {}): {e}",
                        i + 1,
                        keys.join(" or ")
                    ));
                }
            }
        }
        Ok(signed)
    }
}

/// The signatures the tarball of `img` carries for `digest` (its root), as
/// `preseed.json` lists them; every manifest and blob read is checked
/// against its digest, so an altered one is no signature at all.
fn carried_signatures(img: &SourceImage, digest: &Digest) -> Result<Vec<Attached>, String> {
    let listed: Vec<_> =
        img.referrers.iter().filter(|r| r.kind == ReferrerKind::Signature && &r.subject == digest).collect();
    if listed.is_empty() {
        return Ok(Vec::new());
    }
    let archive = Archive::open(&img.path).map_err(|e| e.to_string())?;
    let read = |d: &Digest, size: u64| -> Result<Vec<u8>, String> {
        let entry = archive.blob(d).ok_or_else(|| format!("{}: signature blob {d} is missing", img.rel))?;
        if entry.size != size || size > MAX_SIGNATURE {
            return Err(format!("{}: signature blob {d} is {} bytes, not {size}", img.rel, entry.size));
        }
        let bytes = archive.read_entry(entry).map_err(|e| e.to_string())?;
        if Digest::of(&bytes) != *d {
            return Err(format!("{}: signature blob {d} does not match its digest (altered)", img.rel));
        }
        Ok(bytes)
    };
    let mut attached = Vec::new();
    for r in listed {
        let manifest = read(&r.manifest.digest, r.manifest.size)?;
        for layer in cosign::signature_layers(&manifest) {
            let blob = read(&layer.blob().digest, layer.blob().size)?;
            attached.extend(layer.attach(blob));
        }
    }
    Ok(attached)
}

/// Whether `name` matches `pattern`, where `*` stands for any run of
/// characters (`/` and `:` included) and everything else for itself.
pub fn glob(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else { return rest.is_empty() };
    for p in middle {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_names() {
        assert!(glob("*", "docker.io/library/busybox:1.36"));
        assert!(glob("docker.io/*", "docker.io/library/busybox:1.36"));
        assert!(!glob("docker.io/*", "quay.io/library/busybox:1.36"));
        assert!(glob("*/busybox:*", "docker.io/library/busybox:1.36"));
        assert!(glob("registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.10"));
        assert!(!glob("registry.k8s.io/pause:3.1", "registry.k8s.io/pause:3.10"));
        assert!(glob("a*b*c", "abc"));
        assert!(!glob("a*b*c", "acb"));
        assert!(!glob("ab*ba", "aba"));
        assert!(glob("*.io/*", "ghcr.io/x/y:1"));
    }

    #[test]
    fn policies_name_what_is_wrong() {
        let p = Path::new("/etc/preseed/policy.toml");
        let err = |t: &str| Policy::parse(p, t).expect_err(t).to_string();
        assert!(err("").contains("no [[require]] rule"), "{}", err(""));
        assert!(err("[[require]]\nimages = []\nkeys = [\"k.pub\"]").contains("#1: `images`"));
        assert!(err("[[require]]\nimages = [\"*\"]\nkeys = []").contains("#1: `keys`"));
        let e = err("[[require]]\nimages = [\"*\"]\nkey = [\"k.pub\"]");
        assert!(e.contains("policy /etc/preseed/policy.toml") && e.contains("line 3"), "{e}");
        let e = err("[[require]]\nimages = [\"*\"]\nkeys = [\"nope.pub\"]");
        assert!(e.contains("/etc/preseed/nope.pub"), "{e}");
    }
}
