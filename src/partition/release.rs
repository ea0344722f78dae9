//! A release as `preseed push` publishes it and `preseed pull` rebuilds it.
//!
//! A partition image is mostly blobs: the erofs writer stores each distinct
//! blob once, its whole blocks in a row and its last partial block in a block
//! of its own. The *plan* says where: for each piece of a blob, its offset in
//! the blob, its offset in the image and its length. Every other byte of the
//! filesystem (metadata, tar headers, `preseed.json`) is the *rest*, kept in
//! image order as one zstd stream; the dm-verity tree is not kept at all,
//! since it follows from the data, the salt and the UUID. So a node that
//! already has most blobs fetches the plan, the rest and the blobs it lacks,
//! and writes the same image byte for byte.
//!
//! On a registry a release is an OCI artifact: a manifest of artifact type
//! [`ARTIFACT_TYPE`] whose config is the plan ([`PLAN_MEDIA_TYPE`]) and whose
//! layers are the rest ([`REST_MEDIA_TYPE`]) and then every blob
//! ([`BLOB_MEDIA_TYPE`]), by digest, so a registry shares them with the
//! images themselves and with other releases.
//!
//! The plan is versioned as a whole: a reader refuses a version it does not
//! know rather than build a different image. *Invariant: a plan that parses
//! describes pieces inside the image and inside their blobs, in image order,
//! never overlapping.*

use serde::{Deserialize, Serialize};

use super::Format;
use crate::digest::Digest;
use crate::partition::hashtree;

/// The manifest's `artifactType`.
pub const ARTIFACT_TYPE: &str = "application/vnd.preseed.release.v1";
/// Media type of the plan (the manifest's config).
pub const PLAN_MEDIA_TYPE: &str = "application/vnd.preseed.release.plan.v1+json";
/// Media type of the rest (the first layer).
pub const REST_MEDIA_TYPE: &str = "application/vnd.preseed.release.rest.v1+zstd";
/// Media type of each blob layer: the bytes as the image carries them.
pub const BLOB_MEDIA_TYPE: &str = "application/octet-stream";
/// The plan beside a bundled image (`preseed bundle` writes it for erofs).
pub const PLAN_FILE: &str = "preseed.plan.json";
/// The plan format this preseed reads and writes.
pub const VERSION: u32 = 1;
/// Largest plan accepted (a piece is about 100 bytes of JSON).
pub const MAX_PLAN_BYTES: u64 = 64 << 20;

/// Largest filesystem a plan may describe (erofs' own limit is 16 TiB).
pub const MAX_IMAGE_BYTES: u64 = 1 << 50;

/// Where every blob sits in one partition image, and what proves the image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// [`VERSION`].
    pub version: u32,
    /// The preseed that wrote the image (for people; `version` decides).
    pub writer: String,
    /// The filesystem.
    pub format: Format,
    /// Bytes of the filesystem; a verity tree, if any, follows.
    pub data_bytes: u64,
    /// How the verity tree is rebuilt, for a `--verity` image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<VerityPlan>,
    /// Every blob the image holds whole, each once.
    pub blobs: Vec<PlanBlob>,
    /// The blobs' pieces, in image order.
    pub pieces: Vec<Piece>,
    /// The whole image's size and sha256 (set by `preseed push`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageProof>,
    /// The rest stream (set by `preseed push`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rest: Option<Rest>,
}

/// A blob of the image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanBlob {
    /// Its digest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
}

/// `len` bytes of blob number `blob`, from offset `from`, at image offset `at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// Index into [`Plan::blobs`].
    pub blob: u32,
    /// Offset in the blob.
    pub from: u64,
    /// Offset in the image.
    pub at: u64,
    /// Length.
    pub len: u64,
}

/// What rebuilds the verity tree, and the root hash it must give.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerityPlan {
    /// Salt, hex (32 bytes).
    pub salt: String,
    /// The superblock's UUID, hex (16 bytes).
    pub uuid: String,
    /// Root hash, hex.
    pub root_hash: String,
}

/// The image a pull must end with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageProof {
    /// Bytes.
    pub size: u64,
    /// sha256 of all of them.
    pub sha256: Digest,
}

/// The rest: every filesystem byte outside the pieces, in image order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rest {
    /// Digest of the zstd stream (the layer).
    pub digest: Digest,
    /// Size of the zstd stream.
    pub size: u64,
    /// Bytes it expands to.
    pub bytes: u64,
}

/// A plan that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Another plan version.
    #[error(
        "the release plan is version {found}, this preseed ({ours}) reads version {VERSION}: \
         pull it with the preseed that bundled it ({writer}), or download the whole image"
    )]
    Version {
        /// The plan's version.
        found: u32,
        /// Who wrote it.
        writer: String,
        /// This preseed.
        ours: &'static str,
    },
    /// Not JSON of the expected shape, or too large.
    #[error("the release plan is malformed: {0}")]
    Malformed(String),
    /// Parsed, but the numbers do not add up.
    #[error("the release plan is inconsistent: {0}")]
    Inconsistent(String),
}

impl Plan {
    /// Parses and checks a plan (untrusted bytes).
    pub fn parse(bytes: &[u8]) -> Result<Plan, PlanError> {
        if bytes.len() as u64 > MAX_PLAN_BYTES {
            return Err(PlanError::Malformed(format!("{} bytes, more than {MAX_PLAN_BYTES}", bytes.len())));
        }
        // The version first, so a future plan of another shape says so.
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
            #[serde(default)]
            writer: String,
        }
        let v: Versioned = serde_json::from_slice(bytes).map_err(|e| PlanError::Malformed(e.to_string()))?;
        if v.version != VERSION {
            return Err(PlanError::Version { found: v.version, writer: v.writer, ours: env!("CARGO_PKG_VERSION") });
        }
        let plan: Plan = serde_json::from_slice(bytes).map_err(|e| PlanError::Malformed(e.to_string()))?;
        plan.check()?;
        Ok(plan)
    }

    /// The plan as stored: compact JSON, fields in a fixed order.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Bytes of the filesystem outside every piece (what the rest expands to).
    pub fn rest_bytes(&self) -> u64 {
        self.data_bytes - self.pieces.iter().map(|p| p.len).sum::<u64>()
    }

    /// Size of the whole image: the filesystem and its verity tree.
    pub fn image_bytes(&self) -> u64 {
        match self.verity {
            Some(_) => hashtree::image_len(self.data_bytes),
            None => self.data_bytes,
        }
    }

    /// The blob of a piece.
    pub fn blob(&self, piece: &Piece) -> &PlanBlob {
        &self.blobs[piece.blob as usize]
    }

    /// The invariant: pieces inside the image and their blobs, in order,
    /// not overlapping; blobs listed once; sizes that add up.
    pub fn check(&self) -> Result<(), PlanError> {
        let bad = |m: String| Err(PlanError::Inconsistent(m));
        // Bounded, so every sum below fits in 64 bits (erofs stops at 16 TiB).
        if self.data_bytes > MAX_IMAGE_BYTES || self.pieces.len() as u64 > MAX_PLAN_BYTES {
            return bad(format!("{} bytes in {} pieces is beyond any partition", self.data_bytes, self.pieces.len()));
        }
        let mut seen = std::collections::HashSet::new();
        for b in &self.blobs {
            if !seen.insert(&b.digest) {
                return bad(format!("blob {} is listed twice", b.digest));
            }
        }
        let mut end = 0u64;
        for p in &self.pieces {
            let Some(blob) = self.blobs.get(p.blob as usize) else {
                return bad(format!("a piece names blob {} of {}", p.blob, self.blobs.len()));
            };
            let (Some(at_end), Some(from_end)) = (p.at.checked_add(p.len), p.from.checked_add(p.len)) else {
                return bad(format!("a piece of {} overflows", blob.digest));
            };
            if p.len == 0 || p.at < end || at_end > self.data_bytes || from_end > blob.size {
                return bad(format!(
                    "piece of {} ({} bytes from {} at {}) overlaps another or lies outside the image or the blob",
                    blob.digest, p.len, p.from, p.at
                ));
            }
            end = at_end;
        }
        if let Some(v) = &self.verity {
            let hex_len = |s: &str, n: usize| s.len() == 2 * n && s.bytes().all(|c| c.is_ascii_hexdigit());
            if !hex_len(&v.salt, 32) || !hex_len(&v.uuid, 16) || !hex_len(&v.root_hash, 32) {
                return bad("the verity salt, UUID or root hash is not hex of the right length".into());
            }
            if !self.data_bytes.is_multiple_of(super::verity::BLOCK) || self.data_bytes == 0 {
                return bad(format!("{} filesystem bytes cannot carry a verity tree", self.data_bytes));
            }
        }
        if let Some(image) = &self.image {
            if image.size != self.image_bytes() {
                return bad(format!("the image is {} bytes, the plan adds up to {}", image.size, self.image_bytes()));
            }
        }
        if let Some(rest) = &self.rest {
            if rest.bytes != self.rest_bytes() {
                return bad(format!("the rest expands to {} bytes, the plan leaves {}", rest.bytes, self.rest_bytes()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            version: VERSION,
            writer: "preseed test".into(),
            format: Format::Erofs,
            data_bytes: 5 * 4096,
            verity: None,
            blobs: vec![PlanBlob { digest: Digest::of(b"a"), size: 5000 }],
            pieces: vec![
                Piece { blob: 0, from: 0, at: 4096, len: 4096 },
                Piece { blob: 0, from: 4096, at: 8192, len: 904 },
            ],
            image: None,
            rest: None,
        }
    }

    #[test]
    fn a_plan_round_trips_and_counts_its_rest() {
        let p = plan();
        assert_eq!(Plan::parse(&p.to_json()).unwrap(), p);
        assert_eq!(p.rest_bytes(), 5 * 4096 - 5000);
    }

    #[test]
    fn overlapping_or_outside_pieces_are_refused() {
        let mut p = plan();
        p.pieces[1].at = 6000;
        assert!(matches!(Plan::parse(&p.to_json()), Err(PlanError::Inconsistent(_))));
        let mut p = plan();
        p.pieces[1].len = 2000;
        assert!(matches!(Plan::parse(&p.to_json()), Err(PlanError::Inconsistent(_))));
        let mut p = plan();
        p.pieces[0].at = u64::MAX;
        assert!(matches!(Plan::parse(&p.to_json()), Err(PlanError::Inconsistent(_))));
    }

    #[test]
    fn another_version_is_named_with_its_writer() {
        let e = Plan::parse(br#"{"version": 2, "writer": "preseed 9.0.0", "anything": []}"#).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("version 2") && msg.contains("preseed 9.0.0"), "{msg}");
    }
}
