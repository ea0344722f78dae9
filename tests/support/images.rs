//! Deterministic test images: real gzip'd tar layers of random (incompressible)
//! files, configs with correct `rootfs.diff_ids`, OCI and Docker schema2
//! manifests and indexes, pushed to a [`Registry`]. Same seeds, same digests.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::registry::{sha256_digest, Registry};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Which family of media types an image uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Media {
    Oci,
    Docker,
}

impl Media {
    pub fn manifest(self) -> &'static str {
        match self {
            Media::Oci => OCI_MANIFEST,
            Media::Docker => DOCKER_MANIFEST,
        }
    }
    pub fn index(self) -> &'static str {
        match self {
            Media::Oci => OCI_INDEX,
            Media::Docker => DOCKER_LIST,
        }
    }
    pub fn config(self) -> &'static str {
        match self {
            Media::Oci => OCI_CONFIG,
            Media::Docker => DOCKER_CONFIG,
        }
    }
    pub fn layer(self) -> &'static str {
        match self {
            Media::Oci => OCI_LAYER_GZIP,
            Media::Docker => DOCKER_LAYER_GZIP,
        }
    }
}

/// xorshift64*: tiny, seeded, good enough for incompressible test bytes.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        // Never zero; spread small seeds.
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A layer: `files` random files of `file_size` bytes under `/data/layer-<seed>/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LayerSpec {
    pub seed: u64,
    pub files: usize,
    pub file_size: usize,
}

impl LayerSpec {
    pub const fn new(seed: u64, files: usize, file_size: usize) -> Self {
        LayerSpec { seed, files, file_size }
    }
}

/// A built layer: the gzip blob and the digest of its uncompressed tar.
#[derive(Debug, Clone)]
pub struct Layer {
    pub blob: Vec<u8>,
    pub digest: String,
    pub diff_id: String,
    /// Paths inside the layer, e.g. `data/layer-7/file-0.bin`.
    pub paths: Vec<String>,
}

/// Builds a layer deterministically (mtime 0, uid/gid 0, fixed order, gzip
/// mtime 0). Built layers are memoized: the shared base is built once per process.
pub fn build_layer(spec: &LayerSpec) -> Arc<Layer> {
    static BUILT: Mutex<BTreeMap<LayerSpec, Arc<Layer>>> = Mutex::new(BTreeMap::new());
    if let Some(l) = BUILT.lock().unwrap().get(spec) {
        return l.clone();
    }
    let layer = Arc::new(build_layer_uncached(spec));
    BUILT.lock().unwrap().insert(*spec, layer.clone());
    layer
}

fn build_layer_uncached(spec: &LayerSpec) -> Layer {
    let mut rng = XorShift::new(spec.seed);
    let mut tar = tar::Builder::new(Vec::new());
    let mut paths = Vec::new();
    let dir = |tar: &mut tar::Builder<Vec<u8>>, path: &str| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        tar.append_data(&mut h, path, std::io::empty()).unwrap();
    };
    let base = format!("data/layer-{}", spec.seed);
    dir(&mut tar, "data/");
    dir(&mut tar, &format!("{base}/"));
    let mut content = vec![0u8; spec.file_size];
    for i in 0..spec.files {
        rng.fill(&mut content);
        let path = format!("{base}/file-{i}.bin");
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(content.len() as u64);
        tar.append_data(&mut h, &path, content.as_slice()).unwrap();
        paths.push(path);
    }
    let tar_bytes = tar.into_inner().unwrap();
    let diff_id = sha256_digest(&tar_bytes);
    // Random content does not compress: the fastest level costs nothing in size.
    let mut gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar_bytes).unwrap();
    let blob = gz.finish().unwrap();
    Layer { digest: sha256_digest(&blob), blob, diff_id, paths }
}

/// An image as pushed.
#[derive(Debug, Clone)]
pub struct PushedImage {
    pub repo: String,
    pub manifest_digest: String,
    pub manifest_bytes: Vec<u8>,
    pub media_type: &'static str,
    pub config_digest: String,
    /// Layer digests in manifest order.
    pub layer_digests: Vec<String>,
    /// Config and layers: digest → size.
    pub blob_digests: BTreeMap<String, u64>,
    /// Sum of `blob_digests` sizes (config + layers, no manifest).
    pub total_blob_bytes: u64,
}

/// Builds the config and manifest for `layers` and pushes everything.
/// `reference` is a tag or `None` to push by digest only.
pub fn push_image_for(
    reg: &Registry,
    repo: &str,
    reference: Option<&str>,
    layers: &[LayerSpec],
    media: Media,
    (os, arch): (&str, &str),
) -> PushedImage {
    let built: Vec<Arc<Layer>> = layers.iter().map(build_layer).collect();
    let config = json!({
        "architecture": arch,
        "os": os,
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Labels": { "preseed.test/repo": repo },
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": built.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
        "history": built.iter().map(|l| json!({
            "created": "1970-01-01T00:00:00Z",
            "created_by": format!("preseed test layer {}", l.diff_id),
        })).collect::<Vec<_>>(),
    });
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_digest = reg.push_blob(repo, &config_bytes);

    let mut blob_digests = BTreeMap::new();
    blob_digests.insert(config_digest.clone(), config_bytes.len() as u64);
    // The registry spends ~10-30 ms per upload on its filesystem: upload the
    // layers from a few threads.
    std::thread::scope(|s| {
        for chunk in built.chunks(built.len().div_ceil(4).max(1)) {
            s.spawn(move || chunk.iter().for_each(|l| drop(reg.push_blob(repo, &l.blob))));
        }
    });
    let mut layer_descs = Vec::new();
    for l in &built {
        blob_digests.insert(l.digest.clone(), l.blob.len() as u64);
        layer_descs.push(json!({
            "mediaType": media.layer(),
            "digest": l.digest,
            "size": l.blob.len(),
        }));
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": media.manifest(),
        "config": {
            "mediaType": media.config(),
            "digest": config_digest,
            "size": config_bytes.len(),
        },
        "layers": layer_descs,
    });
    let manifest_bytes = serde_json::to_vec_pretty(&manifest).unwrap();
    let manifest_digest = sha256_digest(&manifest_bytes);
    reg.push_manifest(repo, reference.unwrap_or(&manifest_digest), media.manifest(), &manifest_bytes);
    PushedImage {
        repo: repo.to_string(),
        total_blob_bytes: blob_digests.values().sum(),
        manifest_digest,
        manifest_bytes,
        media_type: media.manifest(),
        config_digest,
        layer_digests: built.iter().map(|l| l.digest.clone()).collect(),
        blob_digests,
    }
}

/// A linux/amd64 image under `repo:tag`.
pub fn push_image(reg: &Registry, repo: &str, tag: &str, layers: &[LayerSpec], media: Media) -> PushedImage {
    push_image_for(reg, repo, Some(tag), layers, media, ("linux", "amd64"))
}

/// A multi-platform index as pushed.
#[derive(Debug, Clone)]
pub struct PushedIndex {
    pub repo: String,
    pub index_digest: String,
    pub index_bytes: Vec<u8>,
    pub media_type: &'static str,
    /// `(os, arch)` → that platform's image (pushed by digest).
    pub platforms: Vec<((String, String), PushedImage)>,
}

impl PushedIndex {
    pub fn platform(&self, os: &str, arch: &str) -> Option<&PushedImage> {
        self.platforms.iter().find(|((o, a), _)| o == os && a == arch).map(|(_, i)| i)
    }
}

/// Pushes one image per platform (each with its own config and one layer of
/// `layer_files` × `file_size` seeded from `seed` + platform position), then
/// an index naming them under `repo:tag`.
pub fn push_index(
    reg: &Registry,
    repo: &str,
    tag: &str,
    platforms: &[(&str, &str)],
    seed: u64,
    layer: (usize, usize),
    media: Media,
) -> PushedIndex {
    let mut pushed = Vec::new();
    let mut descs = Vec::new();
    for (i, &(os, arch)) in platforms.iter().enumerate() {
        let spec = LayerSpec::new(seed + i as u64, layer.0, layer.1);
        let img = push_image_for(reg, repo, None, &[spec], media, (os, arch));
        descs.push(json!({
            "mediaType": img.media_type,
            "digest": img.manifest_digest,
            "size": img.manifest_bytes.len(),
            "platform": { "architecture": arch, "os": os },
        }));
        pushed.push(((os.to_string(), arch.to_string()), img));
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": media.index(),
        "manifests": descs,
    });
    let index_bytes = serde_json::to_vec_pretty(&index).unwrap();
    let index_digest = reg.push_manifest(repo, tag, media.index(), &index_bytes);
    PushedIndex { repo: repo.to_string(), index_digest, index_bytes, media_type: media.index(), platforms: pushed }
}

/// One pinned image of the corpus.
#[derive(Debug, Clone)]
pub struct CorpusImage {
    /// Short name, e.g. `"app-a"`; also the tarball name a test would use.
    pub name: &'static str,
    pub repo: String,
    pub tag: String,
    /// The pinned digest: of the manifest, or of the index for multi-platform.
    pub digest: String,
    pub media_type: &'static str,
    /// Top manifest bytes exactly as pushed.
    pub manifest_bytes: Vec<u8>,
    /// Config + layer blobs of every platform: digest → size.
    pub blobs: BTreeMap<String, u64>,
    /// Per-platform manifests for an index (empty for a single image).
    pub platforms: Vec<((String, String), PushedImage)>,
}

impl CorpusImage {
    /// `host/repo:tag@digest`, as written in bundles.toml.
    pub fn reference(&self, host: &str) -> String {
        format!("{host}/{}:{}@{}", self.repo, self.tag, self.digest)
    }
    pub fn is_index(&self) -> bool {
        !self.platforms.is_empty()
    }
}

/// The standard test corpus (see [`push_test_corpus`]).
#[derive(Debug, Clone)]
pub struct Corpus {
    pub host: String,
    pub images: Vec<CorpusImage>,
    /// Digest of the ~2 MiB base layer shared by app-a, app-b and app-c.
    pub base_layer: String,
}

impl Corpus {
    pub fn image(&self, name: &str) -> &CorpusImage {
        self.images.iter().find(|i| i.name == name).unwrap_or_else(|| panic!("no corpus image {name}"))
    }
    /// Config + layer blobs over all images and platforms, deduplicated.
    pub fn unique_blobs(&self) -> BTreeMap<String, u64> {
        self.images.iter().flat_map(|i| i.blobs.clone()).collect()
    }
    /// Sum of [`Corpus::unique_blobs`] sizes.
    pub fn unique_blob_bytes(&self) -> u64 {
        self.unique_blobs().values().sum()
    }
}

pub const BASE_LAYER: LayerSpec = LayerSpec::new(1, 2, 1 << 20);

/// Pushes the standard corpus:
/// * `corpus/app-a`, `app-b`, `app-c` (`:v1`, OCI): the shared ~2 MiB base layer
///   plus one small unique layer each (3 × 16 KiB);
/// * `corpus/multi:v1`: an OCI index for linux/amd64 and linux/arm64, each its own
///   manifest, config and 64 KiB layer;
/// * `corpus/docker:v1`: Docker schema2 media types, two small layers;
/// * `corpus/many:v1`: 40 layers of one 4 KiB file each.
pub fn push_test_corpus(reg: &Registry) -> Corpus {
    let mut images = Vec::new();
    let single = |name: &'static str, img: PushedImage| CorpusImage {
        name,
        repo: img.repo.clone(),
        tag: "v1".to_string(),
        digest: img.manifest_digest.clone(),
        media_type: img.media_type,
        manifest_bytes: img.manifest_bytes.clone(),
        blobs: img.blob_digests.clone(),
        platforms: Vec::new(),
    };
    let mut base_layer = String::new();
    for (i, name) in ["app-a", "app-b", "app-c"].into_iter().enumerate() {
        let unique = LayerSpec::new(100 + i as u64, 3, 16 << 10);
        let img = push_image(reg, &format!("corpus/{name}"), "v1", &[BASE_LAYER, unique], Media::Oci);
        base_layer = img.layer_digests[0].clone();
        images.push(single(name, img));
    }

    let idx = push_index(
        reg,
        "corpus/multi",
        "v1",
        &[("linux", "amd64"), ("linux", "arm64")],
        200,
        (1, 64 << 10),
        Media::Oci,
    );
    images.push(CorpusImage {
        name: "multi",
        repo: idx.repo.clone(),
        tag: "v1".to_string(),
        digest: idx.index_digest.clone(),
        media_type: idx.media_type,
        manifest_bytes: idx.index_bytes.clone(),
        blobs: idx.platforms.iter().flat_map(|(_, i)| i.blob_digests.clone()).collect(),
        platforms: idx.platforms.clone(),
    });

    let docker = [LayerSpec::new(300, 2, 8 << 10), LayerSpec::new(301, 1, 8 << 10)];
    images.push(single("docker", push_image(reg, "corpus/docker", "v1", &docker, Media::Docker)));

    let many: Vec<LayerSpec> = (0..40).map(|i| LayerSpec::new(400 + i, 1, 4 << 10)).collect();
    images.push(single("many", push_image(reg, "corpus/many", "v1", &many, Media::Oci)));

    Corpus { host: reg.host(), images, base_layer }
}

/// Parses JSON bytes (handy for asserting on manifests and configs).
pub fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}
