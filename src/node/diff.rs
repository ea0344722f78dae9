//! `preseed diff OLD NEW`: what a node must newly import when it moves from
//! partition OLD to partition NEW, for release notes and OTA budgets.
//!
//! Images are matched by slot — namespace and tarball name (`file`) — and
//! each slot is *added*, *removed*, *changed* (another digest), *retagged*
//! (same digest, another set of names) or unchanged; pin/sandbox/boot flag
//! changes are listed beside. The bytes to import are those of the distinct
//! blobs (every file under a tarball's `blobs/sha256/`) that NEW carries and
//! OLD does not, each counted once.
//!
//! Blob lists come from `preseed.json` (`blobs` of each image, written by
//! bundles since that field exists); for an older index they are read from
//! the tarballs, which needs them at hand: a partition image (mounted
//! read-only), a mounted partition, or a bundle output directory holding
//! the image beside its `preseed.json`. A reader of partitions: imports
//! nothing from the build side.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::digest::Digest;
use crate::human::human_bytes;
use crate::node::read::archive::{Archive, ArchiveError};
use crate::node::read::mount::{self, MountError, Mounted};
use crate::node::read::source::{self, Refused, SourceError};
use crate::partition::index::{Carried, IndexedBlob, IndexedImage, PartitionIndex, INDEX_FILE};
use crate::partition::Format;

/// Why an input could not be compared. Every message starts with the input
/// as given on the command line.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// The input does not exist.
    #[error("{input}: no such file or directory")]
    NotFound {
        /// The input.
        input: String,
    },
    /// A directory without `preseed.json`.
    #[error("{input}: no {INDEX_FILE} in this directory: give a partition image, a mounted partition, a bundle output directory or a {INDEX_FILE}")]
    NoIndex {
        /// The input.
        input: String,
    },
    /// Reading a file failed.
    #[error("{input}: {path}: {source}")]
    Io {
        /// The input.
        input: String,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// `preseed.json` cannot be read (the same refusal as `load`'s).
    #[error("{input}: {source}")]
    Index {
        /// The input.
        input: String,
        /// What is wrong.
        source: SourceError,
    },
    /// An entry `load` would refuse (the same message).
    #[error("{input}: {source}")]
    Refused {
        /// The input.
        input: String,
        /// The entry and what is wrong with it.
        source: Box<Refused>,
    },
    /// The partition image could not be mounted.
    #[error("{input}: {source}")]
    Mount {
        /// The input.
        input: String,
        /// The mount error.
        source: MountError,
    },
    /// An index without blob lists and no tarballs to read them from.
    #[error("{input}: this {INDEX_FILE} lists no blobs (written by an older preseed) and the tarballs are not beside it: pass the partition image (or the mounted partition) instead")]
    NoBlobLists {
        /// The input.
        input: String,
    },
    /// A tarball could not be read.
    #[error("{input}: {source}")]
    Tarball {
        /// The input.
        input: String,
        /// The archive error.
        source: ArchiveError,
    },
    /// A file under a tarball's `blobs/sha256/` that is not named by a digest.
    #[error("{input}: {tarball}: {entry:?} is not named by a sha256 digest")]
    BlobName {
        /// The input.
        input: String,
        /// The tarball.
        tarball: PathBuf,
        /// The entry.
        entry: String,
    },
}

/// One side of a diff: an index whose every image has its blob list.
#[derive(Clone, Debug)]
pub struct Partition {
    input: String,
    index: PartitionIndex,
}

impl Partition {
    /// Reads `path`: a partition image file or block device (mounted
    /// read-only, which needs root), a directory (a mounted partition, or a
    /// bundle output directory with `preseed.json` beside `preseed.erofs` or
    /// `preseed.squashfs`), or a `preseed.json`. Blob lists missing from the
    /// index are read from the tarballs.
    pub fn read(path: &Path) -> Result<Partition, DiffError> {
        let input = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => DiffError::NotFound { input: input.clone() },
            _ => DiffError::Io { input: input.clone(), path: path.to_path_buf(), source },
        })?;
        if meta.is_dir() {
            let index_path = path.join(INDEX_FILE);
            if !index_path.exists() {
                return Err(DiffError::NoIndex { input });
            }
            let index = read_index(&input, &index_path, path)?;
            return Partition::with_tarballs(input, index, path, None);
        }
        match mount::sniff(path) {
            Ok(_) => {
                let mounted = mount::mount(path, meta.is_file(), Arc::new(crate::node::sys::Linux))
                    .map_err(|source| DiffError::Mount { input: input.clone(), source })?;
                let root = mounted.path().to_path_buf();
                let index = read_index(&input, &root.join(INDEX_FILE), &root)?;
                Partition::with_tarballs(input, index, &root, Some(mounted))
            }
            Err(MountError::UnknownFormat { .. }) => {
                let beside = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
                let index = read_index(&input, path, beside)?;
                Partition::with_tarballs(input, index, beside, None)
            }
            Err(source) => Err(DiffError::Mount { input, source }),
        }
    }

    /// An index read elsewhere, `input` naming it in messages; every image
    /// must carry its blob list.
    pub fn from_index(input: &str, index: PartitionIndex) -> Result<Partition, DiffError> {
        if index.images.iter().any(|i| i.blobs.is_empty()) {
            return Err(DiffError::NoBlobLists { input: input.to_string() });
        }
        Ok(Partition { input: input.to_string(), index })
    }

    /// The input as named.
    pub fn input(&self) -> &str {
        &self.input
    }

    /// The index, with every image's blob list.
    pub fn index(&self) -> &PartitionIndex {
        &self.index
    }

    /// Fills missing blob lists from the tarballs under `root` (a partition
    /// root), or from the partition image in `root` (a bundle output
    /// directory), mounting it only if need be.
    fn with_tarballs(
        input: String,
        mut index: PartitionIndex,
        root: &Path,
        mounted: Option<Mounted>,
    ) -> Result<Partition, DiffError> {
        if index.images.iter().all(|i| !i.blobs.is_empty()) {
            return Ok(Partition { input, index });
        }
        let mut holder = mounted;
        let mut root = root.to_path_buf();
        let reachable = |root: &Path, index: &PartitionIndex| {
            index.images.iter().filter(|i| i.blobs.is_empty()).all(|i| root.join(&i.path).is_file())
        };
        if holder.is_none() && !reachable(&root, &index) {
            let image = [Format::Erofs, Format::Squashfs]
                .iter()
                .map(|f| root.join(format!("preseed.{}", f.extension())))
                .find(|p| p.is_file())
                .ok_or_else(|| DiffError::NoBlobLists { input: input.clone() })?;
            let m = mount::mount(&image, true, Arc::new(crate::node::sys::Linux))
                .map_err(|source| DiffError::Mount { input: input.clone(), source })?;
            root = m.path().to_path_buf();
            holder = Some(m);
        }
        for image in index.images.iter_mut().filter(|i| i.blobs.is_empty()) {
            image.blobs = tarball_blobs(&input, &root.join(&image.path))?;
        }
        drop(holder);
        Ok(Partition { input, index })
    }
}

/// Reads `preseed.json` as `load` does, refusing what it refuses; `root` is
/// where its tarball paths start.
fn read_index(input: &str, path: &Path, root: &Path) -> Result<PartitionIndex, DiffError> {
    let index = source::read_index(path).map_err(|source| DiffError::Index { input: input.to_string(), source })?;
    if let Some(source) = index.images.iter().find_map(|img| source::refusal(root, path, img)) {
        return Err(DiffError::Refused { input: input.to_string(), source: Box::new(source) });
    }
    Ok(index)
}

/// Every file under a tarball's `blobs/sha256/`, in tarball order.
fn tarball_blobs(input: &str, tarball: &Path) -> Result<Vec<IndexedBlob>, DiffError> {
    let archive = Archive::open(tarball).map_err(|source| DiffError::Tarball { input: input.to_string(), source })?;
    let mut blobs = Vec::new();
    for (name, entry) in archive.entries() {
        let Some(hex) = name.strip_prefix("blobs/sha256/") else { continue };
        let digest: Digest = format!("sha256:{hex}").parse().map_err(|_| DiffError::BlobName {
            input: input.to_string(),
            tarball: tarball.to_path_buf(),
            entry: name.to_string(),
        })?;
        blobs.push((entry.offset, IndexedBlob { digest, size: entry.size }));
    }
    blobs.sort_by_key(|(offset, _)| *offset);
    Ok(blobs.into_iter().map(|(_, b)| b).collect())
}

/// The difference between two partitions, as `--json` prints it:
///
/// ```json
/// {
///   "old": "old.erofs",
///   "new": "new.erofs",
///   "namespaces": [{
///     "namespace": "k8s.io",
///     "added":    [{ "file", "name", "names": [..], "digest", "new_bytes", "new_blobs" }],
///     "removed":  [{ "file", "name", "names": [..], "digest" }],
///     "changed":  [{ "file", "name", "old_digest", "digest", "names_added": [..],
///                    "names_removed": [..], "new_bytes", "new_blobs" }],
///     "retagged": [{ "file", "name", "old_name", "digest", "names_added": [..], "names_removed": [..] }],
///     "flags":    [{ "file", "name", "flag": "pin" | "sandbox" | "boot", "old": bool, "new": bool }],
///     "unchanged": 3
///   }],
///   "totals": { "added", "removed", "changed", "retagged", "unchanged", "flag_changes",
///               "new_blobs", "new_bytes" }
/// }
/// ```
///
/// Namespaces are sorted by name, images within a list by `file`; every key
/// is always present. `name` is the image's main name in NEW (in OLD for
/// `removed`), `names` its extra names; `names_added` / `names_removed`
/// compare the whole set of names (main and extra). `unchanged` counts
/// slots with the same digest and names (their flags may still have
/// changed: see `flags`). A per-image `new_bytes` sums that image's blobs
/// OLD lacks, so two new images sharing a layer both count it; the totals
/// count each distinct blob once, over all of NEW's images (also one that
/// kept its digest but carries other platforms).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diff {
    /// OLD as named.
    pub old: String,
    /// NEW as named.
    pub new: String,
    /// Per namespace present in either, sorted.
    pub namespaces: Vec<NamespaceDiff>,
    /// Over all namespaces.
    pub totals: Totals,
}

/// One namespace's changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NamespaceDiff {
    /// containerd namespace.
    pub namespace: String,
    /// Slots only in NEW.
    pub added: Vec<Added>,
    /// Slots only in OLD.
    pub removed: Vec<Removed>,
    /// Slots in both with another digest.
    pub changed: Vec<Changed>,
    /// Slots in both with the same digest and another set of names.
    pub retagged: Vec<Retagged>,
    /// pin/sandbox/boot changes of slots in both.
    pub flags: Vec<FlagChange>,
    /// Slots in both, same digest, whose signatures, attestations or SBOMs changed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resigned: Vec<Resigned>,
    /// Slots in both with the same digest and names.
    pub unchanged: usize,
}

/// An image only in NEW.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Added {
    /// Tarball name.
    pub file: String,
    /// Main name.
    pub name: String,
    /// Extra names.
    pub names: Vec<String>,
    /// Pinned digest.
    pub digest: Digest,
    /// Bytes of its blobs OLD lacks.
    pub new_bytes: u64,
    /// How many blobs those are.
    pub new_blobs: usize,
    /// Its signatures, attestations and SBOMs.
    #[serde(skip_serializing_if = "Carried::is_empty")]
    pub carries: Carried,
}

/// An image only in OLD.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Removed {
    /// Tarball name.
    pub file: String,
    /// Main name.
    pub name: String,
    /// Extra names.
    pub names: Vec<String>,
    /// Pinned digest.
    pub digest: Digest,
}

/// A slot whose digest changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Changed {
    /// Tarball name.
    pub file: String,
    /// Main name in NEW.
    pub name: String,
    /// Digest in OLD.
    pub old_digest: Digest,
    /// Digest in NEW.
    pub digest: Digest,
    /// Names NEW gives it that OLD did not.
    pub names_added: Vec<String>,
    /// Names OLD gave it that NEW does not.
    pub names_removed: Vec<String>,
    /// Bytes of its blobs OLD lacks.
    pub new_bytes: u64,
    /// How many blobs those are.
    pub new_blobs: usize,
    /// Its signatures, attestations and SBOMs in NEW.
    #[serde(skip_serializing_if = "Carried::is_empty")]
    pub carries: Carried,
}

/// A slot with the same image and other signatures, attestations or SBOMs
/// (re-signed, attested since, or stripped).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Resigned {
    /// Tarball name.
    pub file: String,
    /// Main name in NEW.
    pub name: String,
    /// The (unchanged) digest.
    pub digest: Digest,
    /// What OLD carries for it.
    pub old: Carried,
    /// What NEW carries for it.
    pub new: Carried,
}

/// A slot with the same digest and other names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Retagged {
    /// Tarball name.
    pub file: String,
    /// Main name in NEW.
    pub name: String,
    /// Main name in OLD.
    pub old_name: String,
    /// The (unchanged) digest.
    pub digest: Digest,
    /// Names NEW gives it that OLD did not.
    pub names_added: Vec<String>,
    /// Names OLD gave it that NEW does not.
    pub names_removed: Vec<String>,
}

/// A flag of a slot in both that changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlagChange {
    /// Tarball name.
    pub file: String,
    /// Main name in NEW.
    pub name: String,
    /// `pin`, `sandbox` or `boot`.
    pub flag: &'static str,
    /// In OLD.
    pub old: bool,
    /// In NEW.
    pub new: bool,
}

/// Counts over all namespaces.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Added images.
    pub added: usize,
    /// Removed images.
    pub removed: usize,
    /// Changed images.
    pub changed: usize,
    /// Retagged images.
    pub retagged: usize,
    /// Unchanged images.
    pub unchanged: usize,
    /// Flag changes.
    pub flag_changes: usize,
    /// Distinct blobs of NEW that OLD lacks.
    pub new_blobs: usize,
    /// Their bytes: what a node must newly import.
    pub new_bytes: u64,
}

/// Reads both inputs ([`Partition::read`]) and compares them.
pub fn diff_paths(old: &Path, new: &Path) -> Result<Diff, DiffError> {
    let old = Partition::read(old)?;
    let new = Partition::read(new)?;
    Ok(compare(&old, &new))
}

/// Compares two partitions.
pub fn compare(old: &Partition, new: &Partition) -> Diff {
    let slots = |p: &Partition| -> BTreeMap<(String, String), IndexedImage> {
        p.index.images.iter().map(|i| ((i.namespace.clone(), i.file.clone()), i.clone())).collect()
    };
    let (old_slots, new_slots) = (slots(old), slots(new));
    let old_blobs: BTreeSet<&Digest> = old.index.images.iter().flat_map(|i| &i.blobs).map(|b| &b.digest).collect();
    // An image's own new blobs, each once.
    let fresh = |image: &IndexedImage| -> (u64, usize) {
        let mut seen = BTreeSet::new();
        let mut bytes = 0;
        for b in &image.blobs {
            if !old_blobs.contains(&b.digest) && seen.insert(&b.digest) {
                bytes += b.size;
            }
        }
        (bytes, seen.len())
    };
    let mut namespaces: BTreeMap<String, NamespaceDiff> = BTreeMap::new();
    for ((namespace, file), o) in &old_slots {
        if !new_slots.contains_key(&(namespace.clone(), file.clone())) {
            ns(&mut namespaces, namespace).removed.push(Removed {
                file: file.clone(),
                name: o.name.clone(),
                names: o.names.clone(),
                digest: o.digest.clone(),
            });
        }
    }
    for ((namespace, file), n) in &new_slots {
        let d = ns(&mut namespaces, namespace);
        let Some(o) = old_slots.get(&(namespace.clone(), file.clone())) else {
            let (new_bytes, new_blobs) = fresh(n);
            d.added.push(Added {
                file: file.clone(),
                name: n.name.clone(),
                names: n.names.clone(),
                digest: n.digest.clone(),
                new_bytes,
                new_blobs,
                carries: n.carried(),
            });
            continue;
        };
        let (names_added, names_removed) = name_changes(o, n);
        if o.digest != n.digest {
            let (new_bytes, new_blobs) = fresh(n);
            d.changed.push(Changed {
                file: file.clone(),
                name: n.name.clone(),
                old_digest: o.digest.clone(),
                digest: n.digest.clone(),
                names_added,
                names_removed,
                new_bytes,
                new_blobs,
                carries: n.carried(),
            });
        } else if !names_added.is_empty() || !names_removed.is_empty() || o.name != n.name {
            d.retagged.push(Retagged {
                file: file.clone(),
                name: n.name.clone(),
                old_name: o.name.clone(),
                digest: n.digest.clone(),
                names_added,
                names_removed,
            });
        } else {
            d.unchanged += 1;
        }
        if o.digest == n.digest && o.carried() != n.carried() {
            d.resigned.push(Resigned {
                file: file.clone(),
                name: n.name.clone(),
                digest: n.digest.clone(),
                old: o.carried(),
                new: n.carried(),
            });
        }
        for (flag, old, new) in [("pin", o.pin, n.pin), ("sandbox", o.sandbox, n.sandbox), ("boot", o.boot, n.boot)] {
            if old != new {
                d.flags.push(FlagChange { file: file.clone(), name: n.name.clone(), flag, old, new });
            }
        }
    }
    let mut totals = Totals::default();
    let mut counted = BTreeSet::new();
    for b in new.index.images.iter().flat_map(|i| &i.blobs) {
        if !old_blobs.contains(&b.digest) && counted.insert(&b.digest) {
            totals.new_bytes += b.size;
        }
    }
    totals.new_blobs = counted.len();
    for d in namespaces.values() {
        totals.added += d.added.len();
        totals.removed += d.removed.len();
        totals.changed += d.changed.len();
        totals.retagged += d.retagged.len();
        totals.unchanged += d.unchanged;
        totals.flag_changes += d.flags.len();
    }
    Diff { old: old.input.clone(), new: new.input.clone(), namespaces: namespaces.into_values().collect(), totals }
}

fn ns<'a>(namespaces: &'a mut BTreeMap<String, NamespaceDiff>, name: &str) -> &'a mut NamespaceDiff {
    namespaces.entry(name.to_string()).or_insert_with(|| NamespaceDiff {
        namespace: name.to_string(),
        added: Vec::new(),
        removed: Vec::new(),
        changed: Vec::new(),
        retagged: Vec::new(),
        flags: Vec::new(),
        resigned: Vec::new(),
        unchanged: 0,
    })
}

/// Names (main and extra) NEW has and OLD has not, and the other way round,
/// each in the order its side lists them.
fn name_changes(old: &IndexedImage, new: &IndexedImage) -> (Vec<String>, Vec<String>) {
    let all = |i: &IndexedImage| -> Vec<String> {
        let mut v = vec![i.name.clone()];
        v.extend(i.names.iter().filter(|n| **n != i.name).cloned());
        v
    };
    let (o, n) = (all(old), all(new));
    let added = n.iter().filter(|x| !o.contains(x)).cloned().collect();
    let removed = o.iter().filter(|x| !n.contains(x)).cloned().collect();
    (added, removed)
}

/// `sha256:` and the first 12 hex digits, for people.
fn short(d: &Digest) -> String {
    format!("sha256:{}", &d.hex()[..12])
}

impl Diff {
    /// Stable JSON (see [`Diff`]), with a trailing newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("diff serializes");
        s.push('\n');
        s
    }

    /// A short report for people: per namespace a count line and one line
    /// per difference, then the totals.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for d in &self.namespaces {
            let _ = writeln!(
                out,
                "{}: {} added, {} removed, {} changed, {} retagged, {} unchanged",
                d.namespace,
                d.added.len(),
                d.removed.len(),
                d.changed.len(),
                d.retagged.len(),
                d.unchanged
            );
            let slot = |file: &str| format!("{}/{file}", d.namespace);
            let width = d
                .added
                .iter()
                .map(|i| &i.file)
                .chain(d.removed.iter().map(|i| &i.file))
                .chain(d.changed.iter().map(|i| &i.file))
                .chain(d.retagged.iter().map(|i| &i.file))
                .chain(d.flags.iter().map(|i| &i.file))
                .map(|f| slot(f).len())
                .max()
                .unwrap_or(0);
            let names = |added: &[String], removed: &[String]| {
                added.iter().map(|n| format!("+{n}")).chain(removed.iter().map(|n| format!("-{n}"))).collect::<Vec<_>>()
            };
            for i in &d.added {
                let _ = writeln!(
                    out,
                    "  + {:<width$}  {} ({}) {} new",
                    slot(&i.file),
                    i.name,
                    short(&i.digest),
                    human_bytes(i.new_bytes)
                );
            }
            for i in &d.changed {
                let mut line = format!(
                    "  ~ {:<width$}  {}: {} → {}, {} new",
                    slot(&i.file),
                    i.name,
                    short(&i.old_digest),
                    short(&i.digest),
                    human_bytes(i.new_bytes)
                );
                let renamed = names(&i.names_added, &i.names_removed);
                if !renamed.is_empty() {
                    let _ = write!(line, "; names {}", renamed.join(" "));
                }
                let _ = writeln!(out, "{line}");
            }
            for i in &d.removed {
                let _ = writeln!(out, "  - {:<width$}  {} ({})", slot(&i.file), i.name, short(&i.digest));
            }
            for i in &d.retagged {
                let _ = writeln!(
                    out,
                    "  = {:<width$}  {} ({}): {}",
                    slot(&i.file),
                    i.name,
                    short(&i.digest),
                    names(&i.names_added, &i.names_removed).join(" ")
                );
            }
            for f in &d.flags {
                let _ = writeln!(out, "  ! {:<width$}  {}: {} {} → {}", slot(&f.file), f.name, f.flag, f.old, f.new);
            }
            for r in &d.resigned {
                let _ = writeln!(
                    out,
                    "  * {:<width$}  {} ({}): carried {} → {}",
                    slot(&r.file),
                    r.name,
                    short(&r.digest),
                    r.old.describe(),
                    r.new.describe()
                );
            }
            for i in &d.added {
                if !i.carries.is_empty() {
                    let _ = writeln!(out, "    {:<width$}  {} carries {}", slot(&i.file), i.name, i.carries.describe());
                }
            }
            for i in &d.changed {
                if !i.carries.is_empty() {
                    let _ = writeln!(out, "    {:<width$}  {} carries {}", slot(&i.file), i.name, i.carries.describe());
                }
            }
        }
        let t = &self.totals;
        let flags = if t.flag_changes > 0 { format!(", {} flag changes", t.flag_changes) } else { String::new() };
        let _ = writeln!(
            out,
            "{} added, {} removed, {} changed, {} retagged, {} unchanged{flags}; a node must newly import {} ({} blobs)",
            t.added,
            t.removed,
            t.changed,
            t.retagged,
            t.unchanged,
            human_bytes(t.new_bytes),
            t.new_blobs
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::index::{BuildInfo, INDEX_VERSION};

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn image(ns: &str, file: &str, root: u8, names: &[&str], blobs: &[(u8, u64)]) -> IndexedImage {
        IndexedImage {
            namespace: ns.into(),
            file: file.into(),
            path: format!("{ns}/{file}.tar"),
            name: names[0].into(),
            names: names[1..].iter().map(|s| s.to_string()).collect(),
            digest: digest(root),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            platforms: vec!["linux/amd64".into()],
            pin: true,
            sandbox: false,
            boot: false,
            size: 1,
            sha256: digest(0),
            signed_by: None,
            blobs: blobs.iter().map(|&(d, size)| IndexedBlob { digest: digest(d), size }).collect(),
            referrers: Vec::new(),
        }
    }

    fn partition(input: &str, images: Vec<IndexedImage>) -> Partition {
        let index = PartitionIndex {
            version: INDEX_VERSION,
            images,
            build: BuildInfo { tool: "test".into(), format: "erofs".into() },
            verity: None,
        };
        Partition::from_index(input, index).unwrap()
    }

    #[test]
    fn slots_are_classified_and_shared_new_blobs_counted_once() {
        let old = partition(
            "old",
            vec![
                image("k8s.io", "app", 1, &["r/app:1"], &[(1, 10), (50, 1000)]),
                image("k8s.io", "gone", 2, &["r/gone:1"], &[(2, 10)]),
                image("k8s.io", "keep", 3, &["r/keep:1", "r/keep:old"], &[(3, 10)]),
                image("k8s.io", "same", 4, &["r/same:1"], &[(4, 10)]),
            ],
        );
        let mut same = image("k8s.io", "same", 4, &["r/same:1"], &[(4, 10)]);
        same.boot = true;
        let new = partition(
            "new",
            vec![
                image("k8s.io", "app", 11, &["r/app:2"], &[(11, 20), (50, 1000), (60, 300)]),
                image("k8s.io", "keep", 3, &["r/keep:1", "r/keep:new"], &[(3, 10)]),
                same,
                image("other", "tool", 12, &["r/tool:1"], &[(12, 5), (60, 300)]),
            ],
        );
        let d = compare(&old, &new);
        let k = &d.namespaces[0];
        assert_eq!(k.namespace, "k8s.io");
        assert_eq!(k.changed.len(), 1);
        assert_eq!((k.changed[0].new_bytes, k.changed[0].new_blobs), (320, 2));
        assert_eq!(k.changed[0].names_added, ["r/app:2"]);
        assert_eq!(k.removed[0].file, "gone");
        assert_eq!(k.retagged[0].names_added, ["r/keep:new"]);
        assert_eq!(k.retagged[0].names_removed, ["r/keep:old"]);
        assert_eq!(k.unchanged, 1);
        assert_eq!(
            k.flags,
            [FlagChange { file: "same".into(), name: "r/same:1".into(), flag: "boot", old: false, new: true }]
        );
        let o = &d.namespaces[1];
        assert_eq!((o.added[0].new_bytes, o.added[0].new_blobs), (305, 2));
        // Blob 60 is in two new images and counted once.
        assert_eq!(
            d.totals,
            Totals {
                added: 1,
                removed: 1,
                changed: 1,
                retagged: 1,
                unchanged: 1,
                flag_changes: 1,
                new_blobs: 3,
                new_bytes: 325
            }
        );
        let text = d.render();
        assert!(text.ends_with("1 added, 1 removed, 1 changed, 1 retagged, 1 unchanged, 1 flag changes; a node must newly import 325 B (3 blobs)\n"), "{text}");
    }

    #[test]
    fn an_index_without_blob_lists_is_refused_by_name() {
        let mut img = image("k8s.io", "a", 1, &["r/a:1"], &[]);
        img.blobs.clear();
        let index = PartitionIndex {
            version: INDEX_VERSION,
            images: vec![img],
            build: BuildInfo { tool: "test".into(), format: "erofs".into() },
            verity: None,
        };
        let e = Partition::from_index("old.json", index).unwrap_err();
        assert!(e.to_string().starts_with("old.json: ") && e.to_string().contains("pass the partition image"), "{e}");
    }
}
