//! What a load did: one line per image (imported, updated, already present,
//! failed), the images unpinned, and a summary; as text or JSON.

use std::io::{self, Write};
use std::time::Duration;

use serde::Serialize;

use crate::human::human_bytes;
use crate::partition::index::SignedBy;

/// What happened to one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Content was written or image records were created or retargeted.
    Imported,
    /// Everything was there; only labels (pin, GC references) were changed.
    Updated,
    /// Nothing to do.
    AlreadyPresent,
    /// The image could not be imported; see `error`.
    Failed,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Outcome::Imported => "imported",
            Outcome::Updated => "updated",
            Outcome::AlreadyPresent => "present",
            Outcome::Failed => "FAILED",
        }
    }
}

/// One image's result.
#[derive(Clone, Debug, Serialize)]
pub struct ImageReport {
    /// containerd namespace.
    pub namespace: String,
    /// The tarball, relative to the source root.
    pub tarball: String,
    /// Image names (first is the main one); may be empty for a failed image.
    pub names: Vec<String>,
    /// What happened.
    pub outcome: Outcome,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Blobs written to the content store.
    pub blobs_written: usize,
    /// Bytes written to the content store.
    pub bytes_written: u64,
    /// Blobs `preseed place` had put in containerd's store, registered in
    /// this load without sending their bytes.
    pub blobs_placed: usize,
    /// Their bytes.
    pub bytes_placed: u64,
    /// Whether layers were unpacked into the snapshotter in this load.
    pub unpacked: bool,
    /// Time spent on this image, in milliseconds.
    pub duration_ms: u64,
    /// The keys whose signatures the node's policy checked (`--policy`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signed_by: Vec<SignedBy>,
}

impl ImageReport {
    /// The image's main name (or its tarball), with its namespace.
    pub fn label(&self) -> String {
        format!("{} [{}]", self.names.first().unwrap_or(&self.tarball), self.namespace)
    }
}

/// An image this loader had pinned whose tarball is no longer in the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unpinned {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// A lease an interrupted earlier load left, removed by this one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StaleLease {
    /// Namespace.
    pub namespace: String,
    /// Lease id.
    pub id: String,
}

/// The whole load.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    /// The source, as recorded in the images' source label.
    pub source: String,
    /// containerd's version, from its Version service.
    pub containerd_version: String,
    /// Per image: boot images first, then the rest, each in source order.
    pub images: Vec<ImageReport>,
    /// Images unpinned because their tarball is gone.
    pub unpinned: Vec<Unpinned>,
    /// Leases of interrupted earlier loads, removed.
    pub stale_leases: Vec<StaleLease>,
    /// Things skipped or worth knowing.
    pub warnings: Vec<String>,
    /// Failures outside any one image (unpinning, containerd going away);
    /// the load fails if there are any.
    pub errors: Vec<String>,
    /// Total bytes written to the content store.
    pub bytes_written: u64,
    /// Total bytes of placed blobs registered without sending them.
    pub bytes_placed: u64,
    /// Images imported before READY (boot images and sandbox images).
    pub boot_images: usize,
    /// When systemd was told the boot images are ready, in milliseconds
    /// from the start; absent without `$NOTIFY_SOCKET` or when a boot image
    /// failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_ms: Option<u64>,
    /// Wall time, in milliseconds.
    pub duration_ms: u64,
}

pub(crate) fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

impl LoadReport {
    /// Whether any image, or anything else, failed (the command then exits
    /// non-zero).
    pub fn failed(&self) -> bool {
        !self.errors.is_empty() || self.images.iter().any(|i| i.outcome == Outcome::Failed)
    }

    /// Number of images with the given outcome.
    pub fn count(&self, outcome: Outcome) -> usize {
        self.images.iter().filter(|i| i.outcome == outcome).count()
    }

    /// Machine-readable report.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }

    /// One line per image, warning and error, then a summary line.
    pub fn print_human(&self, out: &mut dyn Write) -> io::Result<()> {
        for w in &self.warnings {
            writeln!(out, "warning: {w}")?;
        }
        for l in &self.stale_leases {
            writeln!(out, "removed   lease {} [{}] (left by an interrupted load)", l.id, l.namespace)?;
        }
        for i in &self.images {
            let name = i.names.first().map(String::as_str).unwrap_or(&i.tarball);
            let secs = i.duration_ms as f64 / 1000.0;
            match &i.error {
                Some(e) => writeln!(out, "{:<9} {name} [{}]: {e}", i.outcome.word(), i.namespace)?,
                None => writeln!(
                    out,
                    "{:<9} {name} [{}] ({} blobs, {}{}{}, {secs:.2}s)",
                    i.outcome.word(),
                    i.namespace,
                    i.blobs_written,
                    human_bytes(i.bytes_written),
                    if i.blobs_placed > 0 {
                        format!(", {} placed blobs registered ({})", i.blobs_placed, human_bytes(i.bytes_placed))
                    } else {
                        String::new()
                    },
                    if i.unpacked { ", unpacked" } else { "" },
                )?,
            }
            for s in &i.signed_by {
                writeln!(out, "          signed by {} ({}, {})", s.key, s.key_sha256, s.format)?;
            }
        }
        for u in &self.unpinned {
            writeln!(out, "unpinned  {} [{}] (no longer in {})", u.name, u.namespace, self.source)?;
        }
        for e in &self.errors {
            writeln!(out, "error: {e}")?;
        }
        writeln!(
            out,
            "preseed load: {} images: {} imported, {} updated, {} already present, {} failed; {} written{} in {:.2}s{} \
             (containerd {})",
            self.images.len(),
            self.count(Outcome::Imported),
            self.count(Outcome::Updated),
            self.count(Outcome::AlreadyPresent),
            self.count(Outcome::Failed),
            human_bytes(self.bytes_written),
            if self.bytes_placed > 0 { format!(", {} placed", human_bytes(self.bytes_placed)) } else { String::new() },
            self.duration_ms as f64 / 1000.0,
            match self.ready_ms {
                Some(ms) => format!(", ready after {:.2}s ({} boot images)", ms as f64 / 1000.0, self.boot_images),
                None => String::new(),
            },
            if self.containerd_version.is_empty() { "version unknown" } else { &self.containerd_version },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_report_has_a_line_per_image_and_a_summary() {
        let img = |outcome, error: Option<&str>| ImageReport {
            namespace: "k8s.io".into(),
            tarball: "k8s.io/x.tar".into(),
            names: vec!["docker.io/library/x:1".into()],
            outcome,
            error: error.map(str::to_string),
            blobs_written: 2,
            bytes_written: 2048,
            blobs_placed: 0,
            bytes_placed: 0,
            unpacked: false,
            duration_ms: 120,
            signed_by: Vec::new(),
        };
        let r = LoadReport {
            source: "/dev/vdb".into(),
            containerd_version: "2.1.9".into(),
            images: vec![img(Outcome::Imported, None), img(Outcome::Failed, Some("digest mismatch"))],
            unpinned: vec![Unpinned { namespace: "k8s.io".into(), name: "docker.io/library/old:1".into() }],
            stale_leases: vec![StaleLease { namespace: "k8s.io".into(), id: "preseed-load-1".into() }],
            warnings: vec![],
            errors: vec![],
            bytes_written: 2048,
            bytes_placed: 0,
            boot_images: 1,
            ready_ms: Some(300),
            duration_ms: 1500,
        };
        assert!(r.failed());
        let mut out = Vec::new();
        r.print_human(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("imported  docker.io/library/x:1 [k8s.io] (2 blobs, 2.0 KiB, 0.12s)"), "{text}");
        assert!(text.contains("FAILED    docker.io/library/x:1 [k8s.io]: digest mismatch"), "{text}");
        assert!(text.contains("unpinned  docker.io/library/old:1 [k8s.io]"), "{text}");
        assert!(text.contains("2 images: 1 imported, 0 updated, 0 already present, 1 failed"), "{text}");
        assert!(text.contains("in 1.50s, ready after 0.30s (1 boot images) (containerd 2.1.9)"), "{text}");
        assert!(text.contains("removed   lease preseed-load-1 [k8s.io]"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["images"][1]["outcome"], "failed");
        assert_eq!(json["containerd_version"], "2.1.9");
    }
}
