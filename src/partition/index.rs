//! `preseed.json`: the partition's index, written at its root and beside it.
//! The loader reads it to know what to import and how to name and pin it.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// File name of the index, at the partition root.
pub const INDEX_FILE: &str = "preseed.json";
/// Directory of an erofs partition laid out as containerd's local content
/// store: `.content/blobs/sha256/<hex>` for every blob of every tarball.
/// Each file's whole 4 KiB chunks are the tarballs' own blocks, so it costs
/// metadata only; `preseed place --overlay` mounts it under containerd's
/// content directory. The leading dot keeps it apart from namespaces
/// (a containerd namespace starts with a letter or digit).
pub const CONTENT_DIR: &str = ".content";
/// Format version of the index; bump on incompatible changes. Readers
/// ignore fields they do not know (no `deny_unknown_fields` here), so an
/// added optional field (as `blobs` and `boot` were) keeps older loaders
/// working with newer partitions; the version is what refuses a change
/// they could not handle.
pub const INDEX_VERSION: u32 = 1;

/// The whole index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartitionIndex {
    /// [`INDEX_VERSION`].
    pub version: u32,
    /// Every image, in manifest order.
    pub images: Vec<IndexedImage>,
    /// What built the partition. No timestamps or host names: the partition
    /// must be byte-identical for the same inputs.
    pub build: BuildInfo,
    /// The dm-verity tree appended to the image: only in the copy beside
    /// the image (the one inside cannot hold its own root hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<crate::partition::verity::VerityInfo>,
}

/// One image of the partition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IndexedImage {
    /// containerd namespace (the directory).
    pub namespace: String,
    /// Tarball name without `.tar`.
    pub file: String,
    /// Path of the tarball inside the partition: `<namespace>/<file>.tar`.
    pub path: String,
    /// Full normalized image name.
    pub name: String,
    /// Extra names the loader gives the image.
    #[serde(default)]
    pub names: Vec<String>,
    /// Digest of the index or manifest the image is pinned to.
    pub digest: Digest,
    /// Media type of that index or manifest.
    pub media_type: String,
    /// Platforms carried, e.g. `linux/amd64`.
    pub platforms: Vec<String>,
    /// Whether the loader pins the image against kubelet GC.
    pub pin: bool,
    /// Whether this is the namespace's pod sandbox image.
    pub sandbox: bool,
    /// Whether the loader imports it before telling systemd it is ready
    /// (`boot = true` in bundles.toml, and every sandbox image).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub boot: bool,
    /// Tarball size in bytes.
    pub size: u64,
    /// sha256 of the whole tarball.
    pub sha256: Digest,
    /// The key whose signature on `digest` was verified at bundle time
    /// (images under a `[verify]` policy only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<SignedBy>,
    /// Every blob under the tarball's `blobs/sha256/` (index, manifests,
    /// configs, layers), in tarball order: what `preseed diff` compares
    /// without opening tarballs. Empty in indexes written before it existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blobs: Vec<IndexedBlob>,
    /// What refers to the image (or to one of its platforms' manifests):
    /// signatures, attestations and SBOMs, as `[partition] referrers` asked.
    /// Their manifests and blobs are in the tarball under `blobs/sha256/`
    /// (and in `blobs` above), outside `index.json`: importers never see them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub referrers: Vec<IndexedReferrer>,
}

/// What a referrer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReferrerKind {
    /// A cosign signature (a sigstore bundle, or cosign's `.sig` tag).
    Signature,
    /// An attestation: an in-toto statement (cosign `attest`, BuildKit).
    Attestation,
    /// A software bill of materials (SPDX, CycloneDX).
    Sbom,
}

impl ReferrerKind {
    /// `signatures`, `attestations`, `sboms`: how bundles.toml names it.
    pub fn plural(self) -> &'static str {
        match self {
            ReferrerKind::Signature => "signatures",
            ReferrerKind::Attestation => "attestations",
            ReferrerKind::Sbom => "sboms",
        }
    }
}

/// One signature, attestation or SBOM of an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedReferrer {
    /// What it is.
    pub kind: ReferrerKind,
    /// The digest it refers to: the image's root, or a platform's manifest.
    pub subject: Digest,
    /// Its manifest (an OCI manifest with `subject`, or the manifest of
    /// cosign's `sha256-<hex>.sig`/`.att`/`.sbom` tag).
    pub manifest: IndexedBlob,
    /// That manifest's media type.
    pub media_type: String,
    /// Its `artifactType`, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// The cosign tag it is served under (none: found through, and served
    /// by, the referrers API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// For attestations, the in-toto predicate types; for SBOMs, their media types.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub predicates: Vec<String>,
    /// For a signature in a sigstore bundle, the fingerprint of the key it
    /// names (sha256 of its DER SubjectPublicKeyInfo, as `preseed inspect`
    /// shows keys); unverified until a policy checks it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Digest>,
    /// Its config and layers, each once.
    pub blobs: Vec<IndexedBlob>,
}

/// One blob of an image's tarball.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedBlob {
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
}

/// Which key verified an image's signature at bundle time (defined here,
/// not in the build side's `verify`, which fills it in: the node side reads
/// it and imports nothing from the build side).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedBy {
    /// The public key file as named in bundles.toml.
    pub key: String,
    /// sha256 of the key (its DER SubjectPublicKeyInfo).
    pub key_sha256: Digest,
    /// `sigstore-bundle` or `simple-signing`.
    pub format: String,
}

/// Provenance of a partition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BuildInfo {
    /// `preseed <version>`.
    pub tool: String,
    /// Filesystem format of the partition.
    pub format: String,
}

/// Why `preseed.json` could not be read as a whole.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Not JSON, or not of this shape.
    #[error("not a valid preseed index: {0}")]
    Json(#[source] serde_json::Error),
    /// Another format version.
    #[error("index format version {found}, this preseed reads version {expected}; use a matching preseed")]
    Version {
        /// The version found.
        found: u32,
        /// The version understood.
        expected: u32,
    },
}

/// What is wrong with one image's entry (the other entries may be fine:
/// readers refuse that image and go on).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EntryProblem {
    /// Not a containerd namespace.
    #[error("invalid containerd namespace {0:?}")]
    Namespace(String),
    /// A path that is absolute, climbs out, or is not `<namespace>/<file>.tar`-like.
    #[error("path {0:?} is not a plain relative path")]
    Path(String),
    /// A name (main or extra) that is not an image reference.
    #[error("name {0:?} is not an image reference (host/repository[:tag][@digest])")]
    Name(String),
}

/// containerd's namespace rule: labels of `[A-Za-z0-9]` joined by `.`, `_` or `-`.
pub fn valid_namespace(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= 76
        && ns.split(['.', '_', '-']).all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Whether `name` is a full, normalized image reference as the bundler
/// writes them: `host[:port]/path[:tag][@sha256:<hex>]`, path components of
/// lowercase letters, digits and single `.`, `_`, `-` (or `__`).
pub fn valid_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 4096 {
        return false;
    }
    let (rest, digest) = match name.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (name, None),
    };
    if digest.is_some_and(|d| d.parse::<Digest>().is_err()) {
        return false;
    }
    let Some((host, path)) = rest.split_once('/') else { return false };
    let (path, tag) = match path.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') => (p, Some(t)),
        _ => (path, None),
    };
    let (hostname, port) = host.split_once(':').unwrap_or((host, ""));
    let host_ok = !hostname.is_empty()
        && hostname.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && port.bytes().all(|b| b.is_ascii_digit())
        && (port.is_empty() != host.contains(':'));
    let component_ok = |c: &str| {
        !c.is_empty()
            && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
            && c.as_bytes()[0].is_ascii_alphanumeric()
            && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
    };
    let tag_ok = |t: &str| {
        !t.is_empty()
            && t.len() <= 128
            && (t.as_bytes()[0].is_ascii_alphanumeric() || t.as_bytes()[0] == b'_')
            && t.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    };
    host_ok && path.split('/').all(component_ok) && tag.is_none_or(tag_ok) && (tag.is_some() || digest.is_some())
}

/// What an image carries, for people and `inspect`/`diff`: its
/// signatures (by the key each names), attestations (by predicate type) and
/// SBOMs (by format), each with the subject when that is one of its
/// platforms' manifests rather than the image itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Carried {
    /// `key sha256:…` (the fingerprint a sigstore bundle names) or
    /// `simple-signing` (cosign's `.sig`, which names no key).
    pub signatures: Vec<String>,
    /// In-toto predicate types.
    pub attestations: Vec<String>,
    /// SBOM media types.
    pub sboms: Vec<String>,
}

impl Carried {
    /// Nothing carried.
    pub fn is_empty(&self) -> bool {
        self.signatures.is_empty() && self.attestations.is_empty() && self.sboms.is_empty()
    }

    /// One line: `2 signatures (key sha256:…; simple-signing), 1
    /// attestation (https://slsa.dev/provenance/v1), no SBOM`.
    pub fn describe(&self) -> String {
        let part = |n: &[String], one: &str, many: &str| match n.len() {
            0 => format!("no {one}"),
            1 => format!("1 {one} ({})", n[0]),
            k => format!("{k} {many} ({})", n.join("; ")),
        };
        [
            part(&self.signatures, "signature", "signatures"),
            part(&self.attestations, "attestation", "attestations"),
            part(&self.sboms, "SBOM", "SBOMs"),
        ]
        .join(", ")
    }
}

impl IndexedImage {
    /// What it carries, summed up.
    pub fn carried(&self) -> Carried {
        let mut c = Carried::default();
        for r in &self.referrers {
            let on =
                if r.subject == self.digest { String::new() } else { format!(" on sha256:{}", &r.subject.hex()[..12]) };
            match r.kind {
                ReferrerKind::Signature => c.signatures.push(match &r.key {
                    Some(k) => format!("key {k}{on}"),
                    None => format!("{}{on}", if r.tag.is_some() { "simple-signing" } else { "key not named" }),
                }),
                ReferrerKind::Attestation => {
                    let p = if r.predicates.is_empty() { "unknown predicate".into() } else { r.predicates.join(" + ") };
                    c.attestations.push(format!("{p}{on}"))
                }
                ReferrerKind::Sbom => {
                    let t = r.predicates.first().or(r.artifact_type.as_ref()).cloned().unwrap_or_default();
                    c.sboms.push(format!("{t}{on}"))
                }
            }
        }
        c
    }

    /// What is wrong with this entry, if anything: a namespace containerd
    /// refuses, a path that leaves the partition, a name that is not a
    /// reference. Checked before anything is read or imported.
    pub fn problem(&self) -> Option<EntryProblem> {
        if !valid_namespace(&self.namespace) {
            return Some(EntryProblem::Namespace(self.namespace.clone()));
        }
        let rel = std::path::Path::new(&self.path);
        if self.path.is_empty()
            || rel.is_absolute()
            || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Some(EntryProblem::Path(self.path.clone()));
        }
        std::iter::once(&self.name).chain(&self.names).find(|n| !valid_name(n)).map(|n| EntryProblem::Name(n.clone()))
    }
}

impl PartitionIndex {
    /// Parses `preseed.json`: the version first, so that a newer index gets
    /// the clearer error. Entries are not checked here ([`IndexedImage::problem`]).
    pub fn from_json(bytes: &[u8]) -> Result<PartitionIndex, IndexError> {
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version = serde_json::from_slice(bytes).map_err(IndexError::Json)?;
        if v.version != INDEX_VERSION {
            return Err(IndexError::Version { found: v.version, expected: INDEX_VERSION });
        }
        serde_json::from_slice(bytes).map_err(IndexError::Json)
    }

    /// Canonical JSON: stable key order (struct order), two-space indent, trailing newline.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("index serializes");
        out.push(b'\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A newer preseed may add optional fields at any level: this reader
    /// must still take the index (only a version bump refuses it).
    #[test]
    fn fields_from_a_newer_writer_are_ignored() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let text = format!(
            r#"{{"version": 1, "later": 1,
                "images": [{{"namespace": "k8s.io", "file": "x", "path": "k8s.io/x.tar", "name": "docker.io/library/x:1",
                  "names": [], "digest": "{digest}", "media_type": "application/vnd.oci.image.index.v1+json",
                  "platforms": ["linux/amd64"], "pin": true, "sandbox": false, "size": 1, "sha256": "{digest}",
                  "blobs": [{{"digest": "{digest}", "size": 1, "later": true}}], "later": "x"}}],
                "build": {{"tool": "preseed 9.9", "format": "erofs", "later": []}}}}"#
        );
        let index = PartitionIndex::from_json(text.as_bytes()).unwrap();
        assert_eq!(index.images.len(), 1);
        assert_eq!(index.images[0].blobs.len(), 1);
        assert_eq!(index.images[0].problem(), None);
    }

    #[test]
    fn names_are_full_references() {
        let d = format!("sha256:{}", "a".repeat(64));
        for ok in ["docker.io/library/nginx:1.27", "registry.k8s.io/pause:3.10", "127.0.0.1:5000/a/b_c:v1.2-x"] {
            assert!(valid_name(ok), "{ok}");
        }
        assert!(valid_name(&format!("quay.io/a/b@{d}")));
        assert!(valid_name(&format!("quay.io/a/b:1@{d}")));
        for bad in ["", " ", "nginx", "docker.io/library/nginx", "docker.io/Library/x:1", "a b/c:1", "h/c:", "h:x/c:1"]
        {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(!valid_name("quay.io/a/b@sha256:zz"));
        assert!(!valid_name("docker.io/library/x:1\n"));
    }
}
