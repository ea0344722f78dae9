//! What an archive holds, as containerd needs it: for each image its names,
//! its root descriptor, and every blob to have in the content store — in an
//! order where children come before their parents — with the GC labels that
//! tie each index and manifest to its children, as containerd's own import sets
//! them.
//!
//! Two archive kinds are understood: OCI image layouts (preseed's tarballs,
//! `ctr images export`, `docker save` since 25) and legacy `docker save`
//! archives (`manifest.json` + `<id>/layer.tar`), for which the manifest is
//! synthesized.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::Deserialize;

use super::archive::{Archive, ArchiveError, Entry};
use crate::digest::Digest;
use crate::oci::{self, Descriptor};

/// Largest index, manifest or config read into memory: containerd's own
/// limit for manifests.
pub const MAX_JSON: u64 = 4 << 20;
/// Deepest nesting of indexes: real images nest two or three levels.
pub const MAX_DEPTH: usize = 16;
/// Most descriptors the walks of one archive may visit in all (each distinct
/// index or manifest is read, hashed and parsed once, whatever the count).
pub const MAX_VISITS: usize = 1 << 20;

/// Why an archive's images could not be planned.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The tar level failed.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// Neither `index.json` nor `manifest.json`.
    #[error("{path}: neither an OCI image layout (index.json) nor a docker save archive (manifest.json)")]
    UnknownLayout {
        /// The archive.
        path: String,
    },
    /// A JSON document does not parse.
    #[error("{path}: {what}: {source}")]
    Json {
        /// The archive.
        path: String,
        /// Which document.
        what: String,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A descriptor's blob is not in the archive.
    #[error("{path}: {what} {digest} is not in the archive")]
    MissingBlob {
        /// The archive.
        path: String,
        /// What kind of blob.
        what: &'static str,
        /// Its digest.
        digest: Digest,
    },
    /// A blob's size in the archive differs from its descriptor.
    #[error("{path}: blob {digest} is {found} bytes in the archive, its descriptor says {expected}")]
    SizeMismatch {
        /// The archive.
        path: String,
        /// The blob.
        digest: Digest,
        /// Descriptor size.
        expected: u64,
        /// Size in the archive.
        found: u64,
    },
    /// A media type the loader does not import.
    #[error("{path}: unsupported media type {media_type:?} for {digest}")]
    Unsupported {
        /// The archive.
        path: String,
        /// The media type.
        media_type: String,
        /// The descriptor's digest.
        digest: Digest,
    },
    /// No image in the archive carries a usable name.
    #[error("{path}: image {digest} has no name (no io.containerd.image.name annotation or full reference)")]
    Unnamed {
        /// The archive.
        path: String,
        /// The root digest.
        digest: Digest,
    },
    /// An index or manifest whose bytes do not hash to its digest.
    #[error("{path}: {what} {digest} does not match its digest (its bytes hash to {found}): the tarball is damaged or crafted")]
    DigestMismatch {
        /// The archive.
        path: String,
        /// What kind of blob.
        what: &'static str,
        /// Its digest.
        digest: Digest,
        /// What its bytes hash to.
        found: Digest,
    },
    /// An index that lists itself, directly or through others.
    #[error("{path}: index {digest} lists itself ({chain}): the tarball is damaged or crafted")]
    Cycle {
        /// The archive.
        path: String,
        /// The index listed again.
        digest: Digest,
        /// The chain of indexes, from the image's root.
        chain: String,
    },
    /// Indexes nested deeper than anything real.
    #[error("{path}: indexes nested more than {MAX_DEPTH} deep under {digest}: the tarball is damaged or crafted")]
    TooDeep {
        /// The archive.
        path: String,
        /// The image's root.
        digest: Digest,
    },
    /// More descriptors than anything real.
    #[error("{path}: the images list more than {MAX_VISITS} descriptors in all: the tarball is damaged or crafted")]
    TooLarge {
        /// The archive.
        path: String,
    },
    /// Something else is inconsistent.
    #[error("{path}: {why}")]
    Invalid {
        /// The archive.
        path: String,
        /// What.
        why: String,
    },
}

/// Where a blob's bytes come from.
#[derive(Clone, Debug)]
pub enum BlobData {
    /// A file in the archive.
    Entry(Entry),
    /// Bytes the loader made (a docker-save manifest).
    Inline(Arc<[u8]>),
}

/// One blob to have in the content store.
#[derive(Clone, Debug)]
pub struct Blob {
    /// Its descriptor.
    pub descriptor: Descriptor,
    /// Its bytes.
    pub data: BlobData,
    /// GC labels to set on it (indexes and manifests only).
    pub labels: BTreeMap<String, String>,
}

impl Blob {
    /// Whether the blob is an index or manifest (it has children).
    pub fn is_parent(&self) -> bool {
        oci::is_index(&self.descriptor.media_type) || oci::is_manifest(&self.descriptor.media_type)
    }
}

/// One image found in an archive.
#[derive(Clone, Debug)]
pub struct ArchiveImage {
    /// Names from the archive (annotations, RepoTags), normalized.
    pub names: Vec<String>,
    /// The index or manifest the image records point at.
    pub root: Descriptor,
    /// Every blob, children before parents, each once.
    pub blobs: Vec<Blob>,
    /// The single-platform manifests, with their configs and layers, for unpacking.
    pub manifests: Vec<PlatformManifest>,
}

/// A manifest of the image and what unpacking needs from it.
#[derive(Clone, Debug)]
pub struct PlatformManifest {
    /// The manifest descriptor (with its platform if it came from an index).
    pub descriptor: Descriptor,
    /// Its config.
    pub config: Descriptor,
    /// Its layers, bottom first.
    pub layers: Vec<Descriptor>,
}

/// Reads every image of an archive.
pub fn images(archive: &Archive) -> Result<Vec<ArchiveImage>, ImageError> {
    if archive.entry("index.json").is_some() {
        oci_layout(archive)
    } else if archive.entry("manifest.json").is_some() {
        docker_save(archive)
    } else {
        Err(ImageError::UnknownLayout { path: display(archive) })
    }
}

fn display(archive: &Archive) -> String {
    archive.path().display().to_string()
}

fn parse<'a, T: Deserialize<'a>>(archive: &Archive, what: &str, bytes: &'a [u8]) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|source| ImageError::Json {
        path: display(archive),
        what: what.to_string(),
        source,
    })
}

fn oci_layout(archive: &Archive) -> Result<Vec<ArchiveImage>, ImageError> {
    let bytes = archive.read("index.json", MAX_JSON)?;
    let index: oci::Index = parse(archive, "index.json", &bytes)?;
    let mut graph = Graph { archive, nodes: HashMap::new(), visits: 0 };
    let mut out = Vec::new();
    for root in index.manifests {
        let mut names = Vec::new();
        if let Some(n) = root.annotations.get(oci::ANNOTATION_CONTAINERD_NAME).and_then(|n| normalize_name(n)) {
            names.push(n);
        }
        if let Some(n) = root.annotations.get(oci::ANNOTATION_REF_NAME) {
            // A bare tag is not a name on its own; a full reference is.
            if n.contains('/') || n.contains('@') {
                if let Some(n) = normalize_name(n) {
                    names.push(n);
                }
            }
        }
        if let Some(extra) = root.annotations.get(oci::ANNOTATION_EXTRA_NAMES) {
            names.extend(extra.split(',').map(str::trim).filter(|s| !s.is_empty()).filter_map(normalize_name));
        }
        dedup(&mut names);
        let mut walk = Walk {
            graph: &mut graph,
            root: root.digest.clone(),
            blobs: Vec::new(),
            seen: HashSet::new(),
            manifests: Vec::new(),
            stack: Vec::new(),
            done: HashSet::new(),
        };
        walk.visit(&root)?;
        let (blobs, manifests) = (walk.blobs, walk.manifests);
        let mut root = root;
        root.annotations.clear();
        root.platform = None;
        out.push(ArchiveImage { names, root, blobs, manifests });
    }
    Ok(out)
}

fn dedup(names: &mut Vec<String>) {
    let mut seen = HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
}

/// An index or manifest, read, checked against its digest and parsed once
/// per archive, however many images or parents list it.
enum Node {
    Index { entry: Entry, children: Vec<Descriptor> },
    Manifest { entry: Entry, manifest: Box<oci::Manifest> },
}

/// The archive's indexes and manifests as they are first needed, and how
/// many descriptors all walks have visited (the bound on untrusted work).
struct Graph<'a> {
    archive: &'a Archive,
    nodes: HashMap<Digest, Arc<Node>>,
    visits: usize,
}

impl Graph<'_> {
    fn entry(&self, d: &Descriptor, what: &'static str) -> Result<Entry, ImageError> {
        let e = self.archive.blob(&d.digest).ok_or_else(|| ImageError::MissingBlob {
            path: display(self.archive),
            what,
            digest: d.digest.clone(),
        })?;
        if e.size != d.size {
            return Err(ImageError::SizeMismatch {
                path: display(self.archive),
                digest: d.digest.clone(),
                expected: d.size,
                found: e.size,
            });
        }
        Ok(e)
    }

    /// The index or manifest `d` names: its size checked against the
    /// descriptor and the cap, its bytes against the digest, before parsing.
    fn node(&mut self, d: &Descriptor) -> Result<Arc<Node>, ImageError> {
        if let Some(n) = self.nodes.get(&d.digest) {
            return Ok(n.clone());
        }
        let path = display(self.archive);
        let what = if oci::is_index(&d.media_type) {
            "index"
        } else if oci::is_manifest(&d.media_type) {
            "manifest"
        } else {
            return Err(ImageError::Unsupported { path, media_type: d.media_type.clone(), digest: d.digest.clone() });
        };
        let entry = self.entry(d, what)?;
        let bytes = self.archive.read(&d.digest.layout_path(), MAX_JSON)?;
        let found = Digest::of(&bytes);
        if found != d.digest {
            return Err(ImageError::DigestMismatch { path, what, digest: d.digest.clone(), found });
        }
        let label = format!("{what} {}", d.digest);
        let node = if what == "index" {
            let index: oci::Index = parse(self.archive, &label, &bytes)?;
            Node::Index { entry, children: index.manifests }
        } else {
            Node::Manifest { entry, manifest: Box::new(parse(self.archive, &label, &bytes)?) }
        };
        let node = Arc::new(node);
        self.nodes.insert(d.digest.clone(), node.clone());
        Ok(node)
    }
}

/// One image's walk from its root: every blob once, children first.
struct Walk<'g, 'a> {
    graph: &'g mut Graph<'a>,
    root: Digest,
    blobs: Vec<Blob>,
    seen: HashSet<Digest>,
    manifests: Vec<PlatformManifest>,
    /// The indexes being visited, root first: a child among them is a cycle.
    stack: Vec<Digest>,
    /// Indexes and manifests already walked in this image.
    done: HashSet<Digest>,
}

impl Walk<'_, '_> {
    fn push(&mut self, d: &Descriptor, data: BlobData, labels: BTreeMap<String, String>) {
        if self.seen.insert(d.digest.clone()) {
            let descriptor = Descriptor::new(&d.media_type, d.digest.clone(), d.size);
            self.blobs.push(Blob { descriptor, data, labels });
        }
    }

    fn visit(&mut self, d: &Descriptor) -> Result<(), ImageError> {
        let path = display(self.graph.archive);
        if self.done.contains(&d.digest) {
            return Ok(());
        }
        if let Some(at) = self.stack.iter().position(|s| *s == d.digest) {
            let chain: Vec<String> = self.stack[at..].iter().chain([&d.digest]).map(short).collect();
            return Err(ImageError::Cycle { path, digest: d.digest.clone(), chain: chain.join(" → ") });
        }
        if self.stack.len() >= MAX_DEPTH {
            return Err(ImageError::TooDeep { path, digest: self.root.clone() });
        }
        self.graph.visits += 1;
        if self.graph.visits > MAX_VISITS {
            return Err(ImageError::TooLarge { path });
        }
        let node = self.graph.node(d)?;
        match &*node {
            Node::Index { entry, children } => {
                let archive = self.graph.archive;
                // Platforms left out at bundle time are absent: only children
                // in the archive are imported and referenced.
                let present: Vec<&Descriptor> = children.iter().filter(|c| archive.blob(&c.digest).is_some()).collect();
                if present.is_empty() {
                    return Err(ImageError::Invalid {
                        path,
                        why: format!("index {} has none of its manifests in the archive", d.digest),
                    });
                }
                self.stack.push(d.digest.clone());
                for child in &present {
                    self.visit(child)?;
                }
                self.stack.pop();
                let labels = gc_labels(present.iter().copied());
                self.push(d, BlobData::Entry(*entry), labels);
            }
            Node::Manifest { entry, manifest: m } => {
                let config_entry = self.graph.entry(&m.config, "config")?;
                self.push(&m.config, BlobData::Entry(config_entry), BTreeMap::new());
                for layer in &m.layers {
                    if oci::is_foreign_layer(&layer.media_type) || !layer.urls.is_empty() {
                        return Err(ImageError::Unsupported {
                            path,
                            media_type: layer.media_type.clone(),
                            digest: layer.digest.clone(),
                        });
                    }
                    let e = self.graph.entry(layer, "layer")?;
                    self.push(layer, BlobData::Entry(e), BTreeMap::new());
                }
                let children: Vec<&Descriptor> = std::iter::once(&m.config).chain(&m.layers).collect();
                self.push(d, BlobData::Entry(*entry), gc_labels(children.into_iter()));
                self.manifests.push(PlatformManifest {
                    descriptor: d.clone(),
                    config: m.config.clone(),
                    layers: m.layers.clone(),
                });
            }
        }
        self.done.insert(d.digest.clone());
        Ok(())
    }
}

/// `sha256:0123456789ab`, for chains in messages.
fn short(d: &Digest) -> String {
    d.to_string().chars().take(19).collect()
}

/// containerd's child GC labels: `containerd.io/gc.ref.content.m.<i>` for
/// manifests, `.config` for the config, `.l.<i>` for layers, `.<i>` for
/// anything else; each numbered in its own sequence.
pub fn gc_labels<'a>(children: impl Iterator<Item = &'a Descriptor>) -> BTreeMap<String, String> {
    let mut counters: BTreeMap<&str, usize> = BTreeMap::new();
    let mut labels = BTreeMap::new();
    for c in children {
        let mt = c.media_type.as_str();
        let key = if mt == oci::OCI_CONFIG || mt == oci::DOCKER_CONFIG {
            "containerd.io/gc.ref.content.config"
        } else if oci::is_manifest(mt) {
            "containerd.io/gc.ref.content.m."
        } else if mt.contains(".layer.") || mt.contains(".rootfs.") {
            "containerd.io/gc.ref.content.l."
        } else {
            "containerd.io/gc.ref.content."
        };
        let idx = counters.entry(key).or_insert(0);
        let full = if *idx > 0 || key.ends_with('.') { format!("{key}{idx}") } else { key.to_string() };
        *idx += 1;
        labels.insert(full, c.digest.to_string());
    }
    labels
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

#[derive(Deserialize)]
struct DockerConfig {
    rootfs: DockerRootfs,
}

#[derive(Deserialize)]
struct DockerRootfs {
    diff_ids: Vec<Digest>,
}

fn docker_save(archive: &Archive) -> Result<Vec<ArchiveImage>, ImageError> {
    let path = display(archive);
    let bytes = archive.read("manifest.json", MAX_JSON)?;
    let entries: Vec<DockerSaveEntry> = parse(archive, "manifest.json", &bytes)?;
    let mut out = Vec::new();
    for e in entries {
        let config_bytes = archive.read(&e.config, MAX_JSON)?;
        let config_digest = Digest::of(&config_bytes);
        let config: DockerConfig = parse(archive, &e.config, &config_bytes)?;
        if config.rootfs.diff_ids.len() != e.layers.len() {
            return Err(ImageError::Invalid {
                path,
                why: format!("{}: {} diff_ids for {} layers", e.config, config.rootfs.diff_ids.len(), e.layers.len()),
            });
        }
        let config_desc = Descriptor::new(oci::DOCKER_CONFIG, config_digest, config_bytes.len() as u64);
        let mut blobs = Vec::new();
        let mut layers = Vec::new();
        let mut seen = HashSet::new();
        for (layer_path, diff_id) in e.layers.iter().zip(&config.rootfs.diff_ids) {
            let entry = archive.entry(layer_path).ok_or_else(|| ArchiveError::Missing {
                path: archive.path().to_path_buf(),
                entry: layer_path.clone(),
            })?;
            let mut head = [0u8; 4];
            let n = std::os::unix::fs::FileExt::read_at(&**archive.file(), &mut head, entry.offset)
                .map_err(|source| ArchiveError::Io { path: archive.path().to_path_buf(), source })?;
            // Legacy docker save stores layers uncompressed: their digest is the
            // diff_id. A compressed one has to be hashed.
            let (media_type, digest) = if super::archive::Compression::sniff(&head[..n.min(entry.size as usize)])
                == super::archive::Compression::Gzip
            {
                (oci::DOCKER_LAYER_GZIP, hash_entry(archive, entry)?)
            } else {
                ("application/vnd.docker.image.rootfs.diff.tar", diff_id.clone())
            };
            let desc = Descriptor::new(media_type, digest, entry.size);
            if seen.insert(desc.digest.clone()) {
                blobs.push(Blob { descriptor: desc.clone(), data: BlobData::Entry(entry), labels: BTreeMap::new() });
            }
            layers.push(desc);
        }
        let config_entry = archive
            .entry(&e.config)
            .ok_or_else(|| ArchiveError::Missing { path: archive.path().to_path_buf(), entry: e.config.clone() })?;
        blobs.push(Blob {
            descriptor: config_desc.clone(),
            data: BlobData::Entry(config_entry),
            labels: BTreeMap::new(),
        });
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": oci::DOCKER_MANIFEST,
            "config": config_desc,
            "layers": layers,
        });
        let manifest_bytes: Arc<[u8]> = serde_json::to_vec(&manifest).expect("manifest serializes").into();
        let root = Descriptor::new(oci::DOCKER_MANIFEST, Digest::of(&manifest_bytes), manifest_bytes.len() as u64);
        let labels = gc_labels(std::iter::once(&config_desc).chain(&layers));
        blobs.push(Blob { descriptor: root.clone(), data: BlobData::Inline(manifest_bytes), labels });
        let mut names: Vec<String> = e.repo_tags.unwrap_or_default().iter().filter_map(|t| normalize_name(t)).collect();
        dedup(&mut names);
        out.push(ArchiveImage {
            names,
            root: root.clone(),
            blobs,
            manifests: vec![PlatformManifest { descriptor: root, config: config_desc, layers }],
        });
    }
    Ok(out)
}

fn hash_entry(archive: &Archive, entry: Entry) -> Result<Digest, ImageError> {
    let mut h = crate::digest::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < entry.size {
        let n = (entry.size - off).min(buf.len() as u64) as usize;
        std::os::unix::fs::FileExt::read_exact_at(&**archive.file(), &mut buf[..n], entry.offset + off)
            .map_err(|source| ArchiveError::Io { path: archive.path().to_path_buf(), source })?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(h.finish())
}

/// Normalizes an image reference the way containerd and docker do:
/// `nginx` → `docker.io/library/nginx:latest`, `foo/bar:1` →
/// `docker.io/foo/bar:1`; references with a registry host are kept.
/// Returns `None` for something that is not a reference.
pub fn normalize_name(name: &str) -> Option<String> {
    let name = name.trim();
    if name.is_empty() || name.chars().any(char::is_whitespace) {
        return None;
    }
    let (first, _) = name.split_once('/').unwrap_or(("", name));
    let has_domain = name.contains('/')
        && (first.contains('.')
            || first.contains(':')
            || first == "localhost"
            || first.chars().any(|c| c.is_ascii_uppercase()));
    let mut full = if has_domain {
        name.to_string()
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    };
    if let Some(rest) = full.strip_prefix("docker.io/") {
        if !rest.contains('/') {
            full = format!("docker.io/library/{rest}");
        }
    }
    // Tag: a ':' after the last '/', unless a digest is present.
    let last = full.rsplit('/').next().unwrap_or("");
    if !full.contains('@') && !last.contains(':') {
        full.push_str(":latest");
    }
    Some(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalize_like_docker() {
        assert_eq!(normalize_name("nginx").unwrap(), "docker.io/library/nginx:latest");
        assert_eq!(normalize_name("nginx:1.27").unwrap(), "docker.io/library/nginx:1.27");
        assert_eq!(normalize_name("foo/bar:1").unwrap(), "docker.io/foo/bar:1");
        assert_eq!(normalize_name("docker.io/nginx").unwrap(), "docker.io/library/nginx:latest");
        assert_eq!(normalize_name("registry.k8s.io/pause:3.10").unwrap(), "registry.k8s.io/pause:3.10");
        assert_eq!(normalize_name("localhost:5000/x").unwrap(), "localhost:5000/x:latest");
        let d = format!("quay.io/a/b@sha256:{}", "a".repeat(64));
        assert_eq!(normalize_name(&d).unwrap(), d);
        assert_eq!(normalize_name(""), None);
    }

    #[test]
    fn gc_labels_number_each_kind_separately() {
        let d = |mt: &str, b: u8| Descriptor::new(mt, Digest::of(&[b]), 1);
        let l = gc_labels([d(oci::OCI_CONFIG, 0), d(oci::OCI_LAYER_GZIP, 1), d(oci::OCI_LAYER_GZIP, 2)].iter());
        assert_eq!(
            l.keys().collect::<Vec<_>>(),
            [
                "containerd.io/gc.ref.content.config",
                "containerd.io/gc.ref.content.l.0",
                "containerd.io/gc.ref.content.l.1"
            ]
        );
        let l = gc_labels([d(oci::OCI_MANIFEST, 0), d(oci::DOCKER_MANIFEST, 1)].iter());
        assert!(l.contains_key("containerd.io/gc.ref.content.m.1"));
    }
}
