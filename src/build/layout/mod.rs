//! The partition's files, planned before a byte is written: one OCI
//! image-layout tarball per image, as segments of a [`tree::PlannedFile`]
//! (bytes made here, whole blobs of the cache), so the writers stream them
//! into a filesystem image or a plain file without a staging copy; the
//! [`tree`] gathers them with `.content/` and `preseed.json`.
//!
//! Each tarball is self-contained and importable unchanged by
//! `ctr images import` and readable by `skopeo inspect oci-archive:`:
//! `oci-layout`, `index.json`, `blobs/`, `blobs/sha256/`, then every blob.
//! Output is deterministic (fixed order, mtime 0, uid/gid 0, fixed modes) and
//! the data of every blob starts on a 4096-byte boundary: a PAX extended
//! header with a `comment` record of the right length pads it there, so that
//! a layer shared by many tarballs is chunk-for-chunk identical in all of them.

pub mod tree;

use std::sync::Arc;

use serde::Serialize;

use crate::build::cache::BlobCache;
use crate::build::layout::tree::{PlannedFile, Segment};
use crate::digest::Digest;
use crate::oci::{self, Descriptor};

/// Alignment of blob data inside a tarball (one erofs block).
pub const BLOB_ALIGN: u64 = 4096;
const BLOCK: u64 = 512;

/// What one tarball holds.
#[derive(Clone, Debug)]
pub struct TarballSpec {
    /// Full normalized image name, e.g. `docker.io/library/nginx:1.27`.
    pub name: String,
    /// The tag, for `org.opencontainers.image.ref.name` (none for digest-only refs).
    pub tag: Option<String>,
    /// Extra names the loader also gives the image.
    pub extra_names: Vec<String>,
    /// What `index.json` points at: the pinned index or manifest.
    pub root: Descriptor,
    /// Every blob to include (root, manifests, configs, layers), each once, in order.
    pub blobs: Vec<Descriptor>,
}

/// The `index.json` of a tarball: one entry, annotated with the image's names.
pub fn index_json(spec: &TarballSpec) -> Vec<u8> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Index<'a> {
        schema_version: u32,
        media_type: &'a str,
        manifests: Vec<Descriptor>,
    }
    let mut root = Descriptor::new(&spec.root.media_type, spec.root.digest.clone(), spec.root.size);
    root.annotations.insert(oci::ANNOTATION_CONTAINERD_NAME.into(), spec.name.clone());
    if let Some(tag) = &spec.tag {
        root.annotations.insert(oci::ANNOTATION_REF_NAME.into(), tag.clone());
    }
    if !spec.extra_names.is_empty() {
        root.annotations.insert(oci::ANNOTATION_EXTRA_NAMES.into(), spec.extra_names.join(","));
    }
    let index = Index { schema_version: 2, media_type: oci::OCI_INDEX, manifests: vec![root] };
    serde_json::to_vec(&index).expect("index.json serializes")
}

/// Plans the tarball for `spec`, with blob bytes taken from `cache`.
pub fn plan_tarball(spec: &TarballSpec, cache: &BlobCache) -> PlannedFile {
    let mut tar = TarPlan::default();
    tar.file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec());
    tar.file("index.json", index_json(spec));
    tar.dir("blobs/");
    tar.dir("blobs/sha256/");
    for blob in &spec.blobs {
        tar.blob(&blob.digest, blob.size, cache);
    }
    tar.finish()
}

/// Builds a tar stream as segments, tracking the offset for alignment.
#[derive(Default)]
struct TarPlan {
    out: PlannedFile,
    pending: Vec<u8>,
    offset: u64,
}

impl TarPlan {
    fn inline(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        self.offset += bytes.len() as u64;
    }

    fn flush(&mut self) {
        if !self.pending.is_empty() {
            let bytes: Arc<[u8]> = std::mem::take(&mut self.pending).into();
            self.out.push(Segment::Inline(bytes));
        }
    }

    fn pad_to_block(&mut self) {
        let rem = self.offset % BLOCK;
        if rem != 0 {
            self.inline(&vec![0; (BLOCK - rem) as usize]);
        }
    }

    fn file(&mut self, path: &str, data: Vec<u8>) {
        self.inline(&ustar_header(path, data.len() as u64, tar::EntryType::Regular));
        self.inline(&data);
        self.pad_to_block();
    }

    fn dir(&mut self, path: &str) {
        self.inline(&ustar_header(path, 0, tar::EntryType::Directory));
    }

    fn blob(&mut self, digest: &Digest, size: u64, cache: &BlobCache) {
        // Data starts after: PAX header block, PAX records (padded), ustar header.
        let after_fixed = (self.offset + 2 * BLOCK) % BLOB_ALIGN;
        let mut records_len = (BLOB_ALIGN - after_fixed) % BLOB_ALIGN;
        if records_len == 0 {
            records_len = BLOB_ALIGN;
        }
        let mut records = Vec::new();
        if size > USTAR_MAX_SIZE {
            records.extend(pax_record("size", &size.to_string()));
        }
        records.extend(pax_padding(records_len as usize - records.len()));
        debug_assert_eq!(records.len() as u64, records_len);
        let pax_name = format!("PaxHeaders/{}", digest.hex());
        self.inline(&ustar_header(&pax_name, records_len, tar::EntryType::XHeader));
        self.inline(&records);
        self.inline(&ustar_header(&digest.layout_path(), size, tar::EntryType::Regular));
        debug_assert_eq!(self.offset % BLOB_ALIGN, 0);
        self.flush();
        self.out.push(Segment::Blob { digest: digest.clone(), size, path: cache.path(digest) });
        self.offset += size;
        self.pad_to_block();
    }

    fn finish(mut self) -> PlannedFile {
        self.flush();
        // End of archive: two zero blocks.
        self.out.push(Segment::Zeros(2 * BLOCK));
        self.out
    }
}

/// Largest size the 11-digit octal ustar size field holds.
const USTAR_MAX_SIZE: u64 = 0o77777777777;

fn ustar_header(path: &str, size: u64, kind: tar::EntryType) -> [u8; 512] {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).expect("layout paths fit ustar name/prefix");
    h.set_entry_type(kind);
    // Oversized blobs carry their size in the PAX record; the field gets 0.
    h.set_size(if size > USTAR_MAX_SIZE { 0 } else { size });
    h.set_mode(if kind == tar::EntryType::Directory { 0o755 } else { 0o644 });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    *h.as_bytes()
}

/// One PAX record: `"<len> <key>=<value>\n"`, where `<len>` counts itself.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    format!("{len} {key}={value}\n").into_bytes()
}

/// `comment` records totalling exactly `len` bytes (len ≥ 12). Some lengths
/// (100, 1000…) cannot be one self-counting record; those get an empty
/// 12-byte record first.
fn pax_padding(len: usize) -> Vec<u8> {
    let digits = len.to_string().len();
    let fill = len - digits - " comment=\n".len();
    let rec = pax_record("comment", &"x".repeat(fill));
    if rec.len() == len {
        return rec;
    }
    let mut out = pax_record("comment", "");
    out.extend(pax_padding(len - out.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn blobs_are_aligned_and_tar_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(dir.path()).unwrap();
        let a = vec![7u8; 5000];
        let b = b"{\"small\":true}".to_vec();
        let da = cache.put_bytes(&a).unwrap();
        let db = cache.put_bytes(&b).unwrap();
        let spec = TarballSpec {
            name: "docker.io/library/x:1".into(),
            tag: Some("1".into()),
            extra_names: vec![],
            root: Descriptor::new(oci::OCI_MANIFEST, db.clone(), b.len() as u64),
            blobs: vec![
                Descriptor::new(oci::OCI_MANIFEST, db.clone(), b.len() as u64),
                Descriptor::new(oci::OCI_LAYER_GZIP, da.clone(), a.len() as u64),
            ],
        };
        let plan = plan_tarball(&spec, &cache);
        let mut offset = 0;
        for seg in &plan.segments {
            if let Segment::Blob { .. } = seg {
                assert_eq!(offset % BLOB_ALIGN, 0);
            }
            offset += seg.len();
        }
        let mut bytes = Vec::new();
        plan.reader().read_to_end(&mut bytes).unwrap();
        let mut archive = tar::Archive::new(&bytes[..]);
        let mut names = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let hdr = entry.header();
            assert_eq!(hdr.mtime().unwrap(), 0);
            assert_eq!(hdr.uid().unwrap(), 0);
            if path.starts_with("blobs/sha256/") && path.len() > 20 {
                assert_eq!(entry.raw_file_position() % BLOB_ALIGN, 0);
                let mut data = Vec::new();
                entry.read_to_end(&mut data).unwrap();
                assert_eq!(Digest::of(&data).layout_path(), path);
            }
            names.push(path);
        }
        assert_eq!(names[..4], ["oci-layout", "index.json", "blobs/", "blobs/sha256/"]);
        assert_eq!(names.len(), 6);
    }

    #[test]
    fn pax_records_count_their_own_length() {
        for len in [12, 99, 100, 101, 512, 1000, 4096] {
            assert_eq!(pax_padding(len).len(), len);
        }
        assert_eq!(pax_record("size", "1"), b"9 size=1\n");
        assert_eq!(pax_record("size", "12345678901"), b"20 size=12345678901\n");
    }
}
