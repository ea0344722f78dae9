//! The parts of the OCI image spec (and Docker schema2) preseed reads:
//! media types, descriptors, platforms, manifests and indexes.
//!
//! Manifests are parsed only to learn their children; their bytes are kept
//! and stored exactly as the registry served them, never re-serialized.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzip layer.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Docker manifest list (schema2).
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest (schema2).
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker gzip layer.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker schema1 (signed) manifest, unsupported.
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// Docker schema1 (unsigned) manifest, unsupported.
pub const DOCKER_SCHEMA1_UNSIGNED: &str = "application/vnd.docker.distribution.manifest.v1+json";

/// Annotation containerd's importer reads as the image name.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// OCI annotation for the tag of an image in a layout.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// preseed's own annotation: extra names (comma-separated) the loader gives the image.
pub const ANNOTATION_EXTRA_NAMES: &str = "dev.preseed.image.names";

/// Media types accepted as an index (multi-platform image).
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_LIST
}

/// Media types accepted as a single-platform image manifest.
pub fn is_manifest(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}

/// Layer media types preseed carries. Foreign (non-distributable) layers are
/// refused: their bytes are not in the registry, so an offline node can't have them.
pub fn is_known_layer(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.diff.tar"
    )
}

/// Foreign-layer media types (Windows base layers and the like).
pub fn is_foreign_layer(media_type: &str) -> bool {
    media_type.contains("foreign") || media_type.contains("nondistributable")
}

/// A content descriptor, as found in indexes and manifests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    #[serde(default)]
    pub media_type: String,
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Platform, on index entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// External URLs (foreign layers); present means "not in the registry".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
}

impl Descriptor {
    /// A plain descriptor with no platform or annotations.
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.to_string(),
            digest,
            size,
            platform: None,
            annotations: BTreeMap::new(),
            urls: Vec::new(),
        }
    }
}

/// An OS/architecture(/variant) triple, written `linux/arm64/v8`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Platform {
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// CPU architecture in GOARCH terms, e.g. `amd64`.
    pub architecture: String,
    /// Variant, e.g. `v8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of the machine preseed runs on, in GOARCH terms.
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform { os: "linux".into(), architecture: architecture.into(), variant: None }
    }

    /// Checks that os, architecture and variant are names the ecosystem
    /// uses (Go's GOOS and GOARCH, the OCI variants): for platforms a person
    /// wrote (bundles.toml), where `linx/amd64` is a typo that would match
    /// nothing. Platforms read from registries are not checked.
    pub fn check_known(&self) -> Result<(), UnknownPlatform> {
        let unknown = |part: &'static str, value: &str, known: &[&str]| UnknownPlatform {
            platform: self.to_string(),
            part,
            value: value.to_string(),
            known: known.join(", "),
        };
        if !KNOWN_OS.contains(&self.os.as_str()) {
            return Err(unknown("os", &self.os, KNOWN_OS));
        }
        let Some((_, variants)) = KNOWN_ARCH.iter().find(|(a, _)| *a == self.architecture) else {
            let arches: Vec<&str> = KNOWN_ARCH.iter().map(|(a, _)| *a).collect();
            return Err(unknown("architecture", &self.architecture, &arches));
        };
        match &self.variant {
            Some(v) if !variants.contains(&v.as_str()) => Err(unknown("variant", v, variants)),
            _ => Ok(()),
        }
    }

    /// Whether an index entry's platform satisfies this wanted platform. A
    /// wanted platform without a variant accepts any variant (`linux/arm64`
    /// matches `linux/arm64/v8`), as containerd's matcher does.
    pub fn matches(&self, candidate: &Platform) -> bool {
        self.os == candidate.os
            && self.architecture == candidate.architecture
            && (self.variant.is_none() || self.variant == candidate.variant)
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Operating systems images are built for (Go's GOOS values).
const KNOWN_OS: &[&str] = &[
    "aix",
    "android",
    "darwin",
    "dragonfly",
    "freebsd",
    "illumos",
    "ios",
    "js",
    "linux",
    "netbsd",
    "openbsd",
    "plan9",
    "solaris",
    "wasip1",
    "windows",
];

/// Architectures (Go's GOARCH values) and the variants each may carry.
const KNOWN_ARCH: &[(&str, &[&str])] = &[
    ("386", &["sse2", "softfloat"]),
    ("amd64", &["v1", "v2", "v3", "v4"]),
    ("arm", &["v5", "v6", "v7", "v8"]),
    (
        "arm64",
        &[
            "v8", "v8.0", "v8.1", "v8.2", "v8.3", "v8.4", "v8.5", "v8.6", "v8.7", "v8.8", "v8.9", "v9", "v9.0", "v9.1",
            "v9.2", "v9.3", "v9.4", "v9.5",
        ],
    ),
    ("loong64", &[]),
    ("mips", &["hardfloat", "softfloat"]),
    ("mipsle", &["hardfloat", "softfloat"]),
    ("mips64", &["hardfloat", "softfloat"]),
    ("mips64le", &["hardfloat", "softfloat"]),
    ("ppc64", &["power8", "power9", "power10"]),
    ("ppc64le", &["power8", "power9", "power10"]),
    ("riscv64", &["rva20u64", "rva22u64", "rva23u64"]),
    ("s390x", &[]),
    ("wasm", &[]),
];

/// A platform whose os, architecture or variant nobody uses.
#[derive(Debug, thiserror::Error)]
#[error("platform {platform:?}: unknown {part} {value:?} (known: {known})")]
pub struct UnknownPlatform {
    /// The platform as written.
    pub platform: String,
    /// `os`, `architecture` or `variant`.
    pub part: &'static str,
    /// The unknown value.
    pub value: String,
    /// The values known for that part.
    pub known: String,
}

/// A platform string that is not `os/arch[/variant]`.
#[derive(Debug, thiserror::Error)]
#[error("invalid platform {0:?}: expected os/arch or os/arch/variant, e.g. linux/amd64")]
pub struct InvalidPlatform(pub String);

impl FromStr for Platform {
    type Err = InvalidPlatform;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => {
                Ok(Platform { os: os.to_string(), architecture: arch.to_string(), variant: None })
            }
            [os, arch, v] if ok(os) && ok(arch) && ok(v) => {
                Ok(Platform { os: os.to_string(), architecture: arch.to_string(), variant: Some(v.to_string()) })
            }
            _ => Err(InvalidPlatform(s.to_string())),
        }
    }
}

/// An image index / manifest list, reduced to what preseed needs.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// `mediaType` field, if present.
    #[serde(default)]
    pub media_type: Option<String>,
    /// The platform manifests.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

/// An image manifest, reduced to what preseed needs.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// `schemaVersion`: 2 for everything preseed accepts.
    pub schema_version: u32,
    /// `mediaType` field, if present.
    #[serde(default)]
    pub media_type: Option<String>,
    /// The image config.
    pub config: Descriptor,
    /// The layers, bottom first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_round_trip_and_match() {
        let p: Platform = "linux/arm64".parse().unwrap();
        let v8: Platform = "linux/arm64/v8".parse().unwrap();
        assert!(p.matches(&v8));
        assert!(!v8.matches(&p));
        assert_eq!(v8.to_string(), "linux/arm64/v8");
        assert!("linux".parse::<Platform>().is_err());
    }
}
