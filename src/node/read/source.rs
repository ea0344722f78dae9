//! Which tarballs a mounted partition or directory holds, and how to name and
//! pin their images: from `preseed.json` when present, else from the layout
//! of existing preload directories — Monogon's `<namespace>/<name>.tar` and
//! k3s-style archives in a flat directory, imported into `k8s.io`.

use std::path::{Path, PathBuf};

use crate::digest::Digest;
pub use crate::partition::index::valid_namespace;
use crate::partition::index::{IndexError, IndexedReferrer, PartitionIndex, INDEX_FILE};

/// Largest `preseed.json` read: some 100 000 images with their blob lists.
pub const MAX_INDEX: u64 = 64 << 20;

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
    /// `preseed.json` cannot be read as an index (not JSON, another version).
    #[error("{path}: {source}")]
    BadIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        source: IndexError,
    },
}

/// An image of `preseed.json` that is not read or imported (the others are).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{index}: image {image:?} ({rel}): {why}", index = .index.display())]
pub struct Refused {
    /// The index file.
    pub index: PathBuf,
    /// Its containerd namespace, as written.
    pub namespace: String,
    /// Its tarball path, as written.
    pub rel: String,
    /// Its main name, as written.
    pub image: String,
    /// Every name it would have had.
    pub names: Vec<String>,
    /// Whether it is a boot image (or the sandbox).
    pub boot: bool,
    /// What is wrong.
    pub why: String,
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
    /// Its signatures, attestations and SBOMs, as `preseed.json` lists them.
    pub referrers: Vec<IndexedReferrer>,
}

/// What a source holds.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// Tarballs in import order.
    pub images: Vec<SourceImage>,
    /// Entries of `preseed.json` refused before anything was read from them
    /// (a bad namespace, path or name): each command reports them as failed.
    pub refused: Vec<Refused>,
    /// Things skipped, for the report.
    pub warnings: Vec<String>,
    /// Whether it came from `preseed.json`.
    pub indexed: bool,
}

/// Lists the tarballs under `root`.
pub fn list(root: &Path) -> Result<Listing, SourceError> {
    let index_path = root.join(INDEX_FILE);
    match std::fs::symlink_metadata(&index_path) {
        Ok(_) => Ok(from_index(root, &index_path, &read_index(&index_path)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => compat(root),
        Err(source) => Err(SourceError::Io { path: index_path, source }),
    }
}

/// Reads `preseed.json` as untrusted input: a regular file of at most
/// [`MAX_INDEX`] bytes, of this index version. `inspect` and `diff` read it
/// through here too, so they refuse what `load` refuses.
pub fn read_index(path: &Path) -> Result<PartitionIndex, SourceError> {
    let bytes = super::file::read_capped(path, MAX_INDEX)
        .map_err(|source| SourceError::Io { path: path.to_path_buf(), source })?;
    PartitionIndex::from_json(&bytes).map_err(|source| SourceError::BadIndex { path: path.to_path_buf(), source })
}

/// Why an entry of the index at `index_path` is refused, if it is: what
/// `preseed.json` says is wrong
/// ([`crate::partition::index::IndexedImage::problem`]), or a path through a
/// symbolic link under `root` (a partition's directories are never links).
pub fn refusal(root: &Path, index_path: &Path, img: &crate::partition::index::IndexedImage) -> Option<Refused> {
    let why = match img.problem() {
        Some(p) => Some(p.to_string()),
        None => {
            let mut at = root.to_path_buf();
            let parts: Vec<_> = Path::new(&img.path).components().collect();
            parts[..parts.len().saturating_sub(1)].iter().find_map(|c| {
                at.push(c);
                match std::fs::symlink_metadata(&at) {
                    Ok(m) if m.file_type().is_symlink() => {
                        Some(format!("path {:?} goes through a symbolic link ({})", img.path, at.display()))
                    }
                    _ => None,
                }
            })
        }
    }?;
    let mut names = vec![img.name.clone()];
    names.extend(img.names.iter().cloned());
    Some(Refused {
        index: index_path.to_path_buf(),
        namespace: img.namespace.clone(),
        rel: img.path.clone(),
        image: img.name.clone(),
        names,
        boot: img.boot || img.sandbox,
        why,
    })
}

fn from_index(root: &Path, index_path: &Path, index: &PartitionIndex) -> Listing {
    let mut listing = Listing { indexed: true, ..Listing::default() };
    for img in &index.images {
        if let Some(r) = refusal(root, index_path, img) {
            listing.refused.push(r);
            continue;
        }
        let mut names = vec![img.name.clone()];
        names.extend(img.names.iter().cloned());
        listing.images.push(SourceImage {
            namespace: img.namespace.clone(),
            path: root.join(&img.path),
            rel: img.path.clone(),
            names,
            digest: Some(img.digest.clone()),
            size: Some(img.size),
            // The sandbox image is always pinned: kubelet GC removing it
            // would make the next pod start need a registry.
            pin: img.pin || img.sandbox,
            boot: img.boot || img.sandbox,
            referrers: img.referrers.clone(),
        });
    }
    listing
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
    // Preload directories are often assembled with links: follow them here,
    // once, so that the tarball itself is opened without following any.
    let path = std::fs::canonicalize(&path).unwrap_or(path);
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
        referrers: Vec::new(),
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
        let l = list(d.path()).unwrap();
        assert!(l.images.is_empty());
        assert!(l.refused[0].to_string().contains("path \"../x.tar\" is not a plain relative path"), "{:?}", l.refused);
        let mut v2 = idx.clone();
        v2["version"] = 2.into();
        std::fs::write(d.path().join(INDEX_FILE), v2.to_string()).unwrap();
        assert!(matches!(
            list(d.path()),
            Err(SourceError::BadIndex { source: IndexError::Version { found: 2, .. }, .. })
        ));
    }
}
