//! Which tarballs a mounted partition or directory holds, and how to name and
//! pin their images: from `preseed.json` when present, else from the layout
//! of existing preload directories — Monogon's `<namespace>/<name>.tar` and
//! k3s-style archives in a flat directory, imported into `k8s.io`.

use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::partition::index::{PartitionIndex, INDEX_FILE, INDEX_VERSION};

/// Namespace of k3s-style archives (the one the CRI plugin uses).
pub const K3S_NAMESPACE: &str = "k8s.io";

/// Why the source's contents could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Reading the directory or index failed.
    #[error("{path}: {source}")]
    Io {
        /// What was read.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `preseed.json` does not parse.
    #[error("{path}: not a valid preseed index: {source}")]
    BadIndex {
        /// The index file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// `preseed.json` is of another format version.
    #[error("{path}: index format version {found}, this preseed reads version {expected}; use a matching preseed")]
    IndexVersion {
        /// The index file.
        path: PathBuf,
        /// The version found.
        found: u32,
        /// The version understood.
        expected: u32,
    },
    /// An index entry has an unusable path or namespace.
    #[error("{path}: image {image:?}: {why}")]
    BadEntry {
        /// The index file.
        path: PathBuf,
        /// The image name.
        image: String,
        /// What is wrong.
        why: String,
    },
}

/// One tarball to import.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceImage {
    /// containerd namespace.
    pub namespace: String,
    /// The tarball on disk.
    pub path: PathBuf,
    /// Its path relative to the source root, for reports.
    pub rel: String,
    /// Names to give the image, from `preseed.json` (first is the main
    /// name); empty means "take them from the archive".
    pub names: Vec<String>,
    /// The root digest `preseed.json` pins the tarball to.
    pub digest: Option<Digest>,
    /// Tarball size `preseed.json` records.
    pub size: Option<u64>,
    /// Whether to pin the image.
    pub pin: bool,
    /// Imported before the loader tells systemd it is ready.
    pub boot: bool,
}

/// What a source holds.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// Tarballs in import order.
    pub images: Vec<SourceImage>,
    /// Things skipped, for the report.
    pub warnings: Vec<String>,
    /// Whether it came from `preseed.json`.
    pub indexed: bool,
}

/// Lists the tarballs under `root`.
pub fn list(root: &Path) -> Result<Listing, SourceError> {
    let index_path = root.join(INDEX_FILE);
    match std::fs::read(&index_path) {
        Ok(bytes) => from_index(root, &index_path, &bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => compat(root),
        Err(source) => Err(SourceError::Io { path: index_path, source }),
    }
}

/// containerd's namespace rule: labels of `[A-Za-z0-9]` joined by `.`, `_` or `-`.
pub fn valid_namespace(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= 76
        && ns.split(['.', '_', '-']).all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()))
}

fn from_index(root: &Path, index_path: &Path, bytes: &[u8]) -> Result<Listing, SourceError> {
    // Read the version first so that a newer index gets the clearer error.
    #[derive(serde::Deserialize)]
    struct Version {
        version: u32,
    }
    let v: Version = serde_json::from_slice(bytes)
        .map_err(|source| SourceError::BadIndex { path: index_path.to_path_buf(), source })?;
    if v.version != INDEX_VERSION {
        return Err(SourceError::IndexVersion {
            path: index_path.to_path_buf(),
            found: v.version,
            expected: INDEX_VERSION,
        });
    }
    let index: PartitionIndex = serde_json::from_slice(bytes)
        .map_err(|source| SourceError::BadIndex { path: index_path.to_path_buf(), source })?;
    let mut listing = Listing { indexed: true, ..Listing::default() };
    for img in index.images {
        let bad = |why: String| SourceError::BadEntry { path: index_path.to_path_buf(), image: img.name.clone(), why };
        if !valid_namespace(&img.namespace) {
            return Err(bad(format!("invalid containerd namespace {:?}", img.namespace)));
        }
        let rel = Path::new(&img.path);
        if rel.is_absolute() || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            return Err(bad(format!("path {:?} is not a plain relative path", img.path)));
        }
        let mut names = vec![img.name.clone()];
        names.extend(img.names.iter().cloned());
        listing.images.push(SourceImage {
            namespace: img.namespace.clone(),
            path: root.join(rel),
            rel: img.path.clone(),
            names,
            digest: Some(img.digest.clone()),
            size: Some(img.size),
            // The sandbox image is always pinned: kubelet GC removing it
            // would make the next pod start need a registry.
            pin: img.pin || img.sandbox,
            boot: img.boot || img.sandbox,
        });
    }
    Ok(listing)
}

/// File names k3s accepts as image archives.
pub fn is_k3s_archive(name: &str) -> bool {
    [".tar", ".tar.gz", ".tgz", ".tar.zst", ".tzst"].iter().any(|ext| name.ends_with(ext) && name.len() > ext.len())
}

fn sorted_entries(dir: &Path) -> Result<Vec<std::fs::DirEntry>, SourceError> {
    let io = |source| SourceError::Io { path: dir.to_path_buf(), source };
    let mut entries: Vec<_> = std::fs::read_dir(dir).map_err(io)?.collect::<Result<_, _>>().map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    Ok(entries)
}

/// No index: a Monogon layout (`<ns>/<name>.tar`) and/or k3s-style archives
/// at the top level (namespace `k8s.io`).
fn compat(root: &Path) -> Result<Listing, SourceError> {
    let mut listing = Listing::default();
    for e in sorted_entries(root)? {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        // Follow symlinks: preload dirs are often assembled with links.
        let Ok(meta) = std::fs::metadata(&path) else {
            listing.warnings.push(format!("{name}: dangling link, skipped"));
            continue;
        };
        if meta.is_dir() {
            if !valid_namespace(&name) {
                listing.warnings.push(format!("{name}/: not a valid containerd namespace name, skipped"));
                continue;
            }
            for f in sorted_entries(&path)? {
                let fname = f.file_name().to_string_lossy().into_owned();
                let fpath = f.path();
                let rel = format!("{name}/{fname}");
                if std::fs::metadata(&fpath).map(|m| m.is_file()).unwrap_or(false) && fname.ends_with(".tar") {
                    listing.images.push(compat_image(&name, fpath, rel));
                } else {
                    listing.warnings.push(format!("{rel}: not a <namespace>/<name>.tar image tarball, skipped"));
                }
            }
        } else if meta.is_file() && is_k3s_archive(&name) {
            listing.images.push(compat_image(K3S_NAMESPACE, path, name));
        } else {
            listing
                .warnings
                .push(format!("{name}: not an image archive (.tar, .tar.gz, .tgz, .tar.zst, .tzst), skipped"));
        }
    }
    Ok(listing)
}

fn compat_image(namespace: &str, path: PathBuf, rel: String) -> SourceImage {
    // No index, no boot classes: everything is imported before READY.
    SourceImage {
        namespace: namespace.to_string(),
        path,
        rel,
        names: Vec::new(),
        digest: None,
        size: None,
        pin: true,
        boot: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_follow_containerd_rules() {
        assert!(valid_namespace("k8s.io"));
        assert!(valid_namespace("default"));
        assert!(valid_namespace("a-b_c.d"));
        assert!(!valid_namespace(""));
        assert!(!valid_namespace(".x"));
        assert!(!valid_namespace("a..b"));
        assert!(!valid_namespace("a/b"));
    }

    #[test]
    fn compat_dir_lists_monogon_and_k3s_archives_and_warns_on_strays() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::create_dir_all(p.join("k8s.io/nested")).unwrap();
        std::fs::create_dir_all(p.join("default")).unwrap();
        std::fs::write(p.join("k8s.io/pause.tar"), b"").unwrap();
        std::fs::write(p.join("k8s.io/readme.txt"), b"").unwrap();
        std::fs::write(p.join("default/a.tar"), b"").unwrap();
        std::fs::write(p.join("b.tar.zst"), b"").unwrap();
        std::fs::write(p.join("c.tgz"), b"").unwrap();
        std::fs::write(p.join("notes.md"), b"").unwrap();
        let l = list(p).unwrap();
        let got: Vec<(&str, &str)> = l.images.iter().map(|i| (i.namespace.as_str(), i.rel.as_str())).collect();
        assert_eq!(
            got,
            [
                ("k8s.io", "b.tar.zst"),
                ("k8s.io", "c.tgz"),
                ("default", "default/a.tar"),
                ("k8s.io", "k8s.io/pause.tar")
            ]
        );
        assert_eq!(l.warnings.len(), 3, "{:?}", l.warnings);
        assert!(!l.indexed);
    }

    #[test]
    fn index_paths_must_stay_inside() {
        let d = tempfile::tempdir().unwrap();
        let idx = serde_json::json!({
            "version": 1,
            "images": [{
                "namespace": "k8s.io", "file": "x", "path": "../x.tar", "name": "docker.io/library/x:1",
                "names": [], "digest": format!("sha256:{}", "0".repeat(64)),
                "media_type": "application/vnd.oci.image.manifest.v1+json", "platforms": [],
                "pin": true, "sandbox": false, "size": 1, "sha256": format!("sha256:{}", "0".repeat(64))
            }],
            "build": { "tool": "preseed 0.1.0", "format": "erofs" }
        });
        std::fs::write(d.path().join(INDEX_FILE), idx.to_string()).unwrap();
        assert!(matches!(list(d.path()), Err(SourceError::BadEntry { .. })));
        let mut v2 = idx.clone();
        v2["version"] = 2.into();
        std::fs::write(d.path().join(INDEX_FILE), v2.to_string()).unwrap();
        assert!(matches!(list(d.path()), Err(SourceError::IndexVersion { found: 2, .. })));
    }
}
