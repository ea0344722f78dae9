//! Stage 5: the partition. Written under a staging name while the blobs
//! taken from the cache are hashed again on the other cores; a damaged one
//! is evicted and nothing is put in place. Then the verity tree, the rename,
//! and `preseed.json` (and `preseed.roothash`, and for erofs the release
//! plan `preseed.plan.json` that `preseed push` publishes) beside the image. A stamp
//! records the plan the image was written from, so a warm run with nothing
//! changed does not rewrite it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::fetch::Fetched;
use super::{io_err, write_atomically, BundleError, DamagedBlob, Plan, Run};
use crate::build::layout::tree::Tree;
use crate::build::write::{erofs, squashfs};
use crate::digest::{Digest, Hasher};
use crate::partition::index::{PartitionIndex, INDEX_FILE};
use crate::partition::release::{self, Plan as ReleasePlan, VerityPlan, PLAN_FILE};
use crate::partition::verity::VerityInfo;
use crate::partition::Format;

/// What the write stage produced.
pub(super) struct Written {
    /// The partition image.
    pub(super) partition: PathBuf,
    /// Its size.
    pub(super) bytes: u64,
    /// Its index (as inside the image).
    pub(super) index: PartitionIndex,
    /// The verity tree appended to it, if any.
    pub(super) verity: Option<VerityInfo>,
}

/// Writes the partition (unless the stamp says it is up to date).
pub(super) fn partition(run: &Run<'_>, plan: &Plan, fetched: Fetched) -> Result<Written, BundleError> {
    let Fetched { sums, sum_keys, staged, unverified, .. } = fetched;
    let (format, cache, staging) = (run.format, &run.cache, run.staging());
    let spec_blobs: Vec<(String, Vec<Digest>)> = plan
        .images
        .iter()
        .zip(plan.tarballs.iter())
        .map(|(img, (spec, _))| (img.entry.label(), spec.blobs.iter().map(|b| b.digest.clone()).collect()))
        .collect();
    let (tree, index) = plan.assemble(sums, format);
    let partition = run.partition();
    let mut stamp = Stamp::of(&tree, format, run.verity);
    let plan_path = run.opts.out.join(PLAN_FILE);
    // An erofs image is up to date only with its release plan beside it.
    let planned = format != Format::Erofs || plan_path.is_file();
    if let Some((bytes, recorded)) = stamp.matches(&partition).filter(|_| planned) {
        run.progress().line(&format!("{} is up to date", partition.display()));
        return Ok(Written { partition, bytes, index, verity: recorded });
    }
    run.progress().line(&format!("writing {}", partition.display()));
    // Written under a staging name while the unverified blobs are hashed on
    // the other cores; renamed into place only if all match.
    let (written, damaged) = std::thread::scope(|scope| {
        let check = scope.spawn(|| cache.check(&unverified));
        let written = match format {
            Format::Erofs => match staged {
                Some(staged) => staged.finish(&tree),
                None => erofs::write(&tree, &staging),
            }
            .map(|s| (s.image_bytes, Some((s.blobs, s.pieces))))
            .map_err(|source| BundleError::Erofs { path: partition.clone(), source }),
            Format::Squashfs => squashfs::write(&tree, &staging)
                .map(|s| (s.image_bytes, None))
                .map_err(|source| BundleError::Squashfs { path: partition.clone(), source }),
        };
        (written, check.join().expect("hashing thread panicked"))
    });
    if !damaged.is_empty() {
        let _ = std::fs::remove_file(&staging);
        let mut blobs = Vec::new();
        for (digest, problem) in damaged {
            cache.evict(&digest)?;
            let users: Vec<usize> = (0..spec_blobs.len()).filter(|i| spec_blobs[*i].1.contains(&digest)).collect();
            // Tarball sums computed from the damaged bytes must go too.
            for i in &users {
                let _ = std::fs::remove_file(&sum_keys[*i]);
            }
            let images = users.iter().map(|i| spec_blobs[*i].0.clone()).collect();
            blobs.push(DamagedBlob { digest, problem, images });
        }
        return Err(BundleError::Damaged { cache: cache.root().to_path_buf(), blobs });
    }
    let (bytes, placed) = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&staging);
            return Err(e);
        }
    };
    let data_bytes = bytes;
    let mut salt_and_uuid = None;
    let bytes = if run.verity {
        // Salt and UUID from the plan: the same inputs, the same bytes.
        let salt = Digest::of(format!("preseed verity salt {}", stamp.plan).as_bytes());
        let mut salt_bytes = [0u8; 32];
        hex::decode_to_slice(salt.hex(), &mut salt_bytes).map_err(|e| io_err(&staging)(std::io::Error::other(e)))?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&salt_bytes[16..]);
        let info = crate::partition::hashtree::append(&staging, &salt_bytes, &uuid).map_err(io_err(&staging))?;
        stamp.verity = Some(info);
        salt_and_uuid = Some((salt_bytes, uuid));
        std::fs::metadata(&staging).map_err(io_err(&staging))?.len()
    } else {
        bytes
    };
    // The image appears under its name whole (it was fsynced as written),
    // and the rename itself is made durable.
    // The plan goes first: a plan beside an older image fails `preseed
    // push`'s check of every blob, never a pull.
    match placed {
        Some((blobs, pieces)) => {
            let verity = stamp.verity.as_ref().zip(salt_and_uuid).map(|(info, (salt, uuid))| VerityPlan {
                salt: hex::encode(salt),
                uuid: hex::encode(uuid),
                root_hash: info.root_hash.clone(),
            });
            let plan = ReleasePlan {
                version: release::VERSION,
                writer: format!("preseed {}", env!("CARGO_PKG_VERSION")),
                format,
                data_bytes,
                verity,
                blobs,
                pieces,
                image: None,
                rest: None,
            };
            write_atomically(&plan_path, &plan.to_json())?;
        }
        None => match std::fs::remove_file(&plan_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&plan_path)(e)),
            _ => {}
        },
    }
    std::fs::rename(&staging, &partition).map_err(io_err(&partition))?;
    std::fs::File::open(&run.opts.out).and_then(|d| d.sync_all()).map_err(io_err(&run.opts.out))?;
    stamp.record(&partition);
    Ok(Written { partition, bytes, index, verity: stamp.verity })
}

/// `preseed.json` beside the image (saying where its verity tree is, which
/// the copy inside cannot), and `preseed.roothash` for a verity image. An
/// image of the other format from an earlier run goes: the directory's one
/// `preseed.json` must describe the one image in it.
pub(super) fn index_beside(run: &Run<'_>, written: &Written) -> Result<(), BundleError> {
    let out = &run.opts.out;
    for other in [Format::Erofs, Format::Squashfs].into_iter().filter(|f| *f != run.format) {
        let image = out.join(format!("preseed.{}", other.extension()));
        if image.exists() {
            std::fs::remove_file(&image).map_err(io_err(&image))?;
            let _ = std::fs::remove_file(Stamp::path(&image));
            run.progress().line(&format!(
                "removed {} (this directory now holds the {} image; preseed.json describes it)",
                image.display(),
                run.format
            ));
        }
    }
    let outside = PartitionIndex { verity: written.verity.clone(), ..written.index.clone() }.to_json();
    write_atomically(&out.join(INDEX_FILE), &outside)?;
    let roothash_path = out.join("preseed.roothash");
    match &written.verity {
        Some(info) => write_atomically(&roothash_path, format!("{}\n", info.root_hash).as_bytes()),
        None => match std::fs::remove_file(&roothash_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&roothash_path)(e)),
            _ => Ok(()),
        },
    }
}

/// What determines a partition's bytes: the format, the writer, and every
/// file's path and segments (inline bytes by hash, blobs by digest). Recorded
/// beside the image so a warm bundle with an unchanged plan skips rewriting it,
/// as make would.
#[derive(Serialize, Deserialize, PartialEq)]
struct Stamp {
    plan: Digest,
    size: u64,
    modified_ns: u128,
    /// The verity tree written after the filesystem, if any.
    #[serde(default)]
    verity: Option<VerityInfo>,
}

impl Stamp {
    fn of(tree: &Tree, format: Format, verity: bool) -> Stamp {
        use crate::build::layout::tree::Segment;
        let mut h = Hasher::new();
        h.update(format!("preseed {} {format}\n", env!("CARGO_PKG_VERSION")).as_bytes());
        if verity {
            h.update(b"verity sha256 4096\n");
        }
        for (path, file) in tree.files() {
            h.update(format!("file {path}\n").as_bytes());
            for segment in &file.segments {
                let line = match segment {
                    Segment::Inline(bytes) => format!("inline {}\n", Digest::of(bytes)),
                    Segment::Zeros(n) => format!("zeros {n}\n"),
                    Segment::Blob { digest, size, .. } => format!("blob {digest} {size}\n"),
                };
                h.update(line.as_bytes());
            }
        }
        Stamp { plan: h.finish(), size: 0, modified_ns: 0, verity: None }
    }

    fn path(partition: &Path) -> PathBuf {
        let name = partition.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        partition.with_file_name(format!(".{name}.stamp"))
    }

    fn observed(&self, partition: &Path) -> Option<Stamp> {
        let meta = std::fs::metadata(partition).ok()?;
        let modified_ns = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
        Some(Stamp { plan: self.plan.clone(), size: meta.len(), modified_ns, verity: self.verity.clone() })
    }

    /// The partition's size (and its verity tree) if it was written from
    /// this very plan and not touched since.
    fn matches(&self, partition: &Path) -> Option<(u64, Option<VerityInfo>)> {
        let recorded: Stamp = serde_json::from_slice(&std::fs::read(Self::path(partition)).ok()?).ok()?;
        let observed = Stamp { verity: recorded.verity.clone(), ..self.observed(partition)? };
        (recorded == observed).then_some((observed.size, recorded.verity))
    }

    /// Best effort: without a stamp the next run just rewrites the image.
    fn record(&self, partition: &Path) {
        if let Some(observed) = self.observed(partition) {
            let _ = std::fs::write(Self::path(partition), serde_json::to_vec(&observed).unwrap_or_default());
        }
    }
}
