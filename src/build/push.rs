//! `preseed push OUT REF`: publishes a bundled partition as a release (an
//! OCI artifact, format in [`crate::partition::release`]) that `preseed pull`
//! rebuilds byte for byte.
//!
//! From the image and the plan `preseed bundle` wrote beside it: one pass
//! hashes the whole image and packs every byte outside the blobs into the
//! rest (zstd); every blob is read back from the image and checked against
//! its digest. Then blobs the repository already holds (earlier releases)
//! are skipped after a HEAD, those an image's own repository on the same
//! registry holds are mounted from it, the others are uploaded from the image, and the plan and the manifest go last, so a
//! release is visible only whole.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use oci_client::errors::OciDistributionError;
use oci_client::RegistryOperation;
use serde::Serialize;

use crate::digest::{Digest, Hasher};
use crate::distribution::{self, auth::AuthError};
use crate::partition::index::{PartitionIndex, INDEX_FILE};
use crate::partition::release::{
    ImageProof, Plan, PlanError, Rest, ARTIFACT_TYPE, BLOB_MEDIA_TYPE, PLAN_FILE, PLAN_MEDIA_TYPE, REST_MEDIA_TYPE,
};
use crate::partition::Format;

/// What to push where.
#[derive(Clone, Debug)]
pub struct PushOptions {
    /// The bundle's output directory.
    pub out: PathBuf,
    /// `registry/repository:tag`.
    pub reference: String,
    /// Plain HTTP.
    pub insecure: bool,
}

/// What a push did.
#[derive(Clone, Debug, Serialize)]
pub struct PushReport {
    /// The reference pushed to.
    pub reference: String,
    /// The release manifest's digest: pull by it to get exactly this release.
    pub digest: Digest,
    /// Blobs (and the rest and the plan) uploaded or found already there.
    pub blobs: Counts,
    /// Their bytes.
    pub bytes: Counts,
}

/// Uploaded, already-present and mounted counts.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Counts {
    /// Sent by this push.
    pub uploaded: u64,
    /// The repository had them.
    pub present: u64,
    /// Mounted from another repository of the same registry (an image's own).
    pub mounted: u64,
}

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// No erofs image in the directory.
    #[error(
        "{out}: no preseed.erofs here{squashfs}: push publishes an erofs bundle (the default format); \
         run `preseed bundle` into this directory first"
    )]
    NoImage {
        /// The directory.
        out: PathBuf,
        /// A note when a squashfs image is there instead.
        squashfs: &'static str,
    },
    /// The image has no plan beside it.
    #[error("{path}: missing: bundle again with this preseed (it writes the release plan beside the image)")]
    NoPlan {
        /// Where it should be.
        path: PathBuf,
    },
    /// The plan is unusable.
    #[error("{path}: {source}")]
    Plan {
        /// The plan file.
        path: PathBuf,
        /// Why.
        source: PlanError,
    },
    /// The image is not what its plan describes (rewritten since?).
    #[error("{image}: {problem}: the image and {PLAN_FILE} beside it do not belong together; bundle again")]
    Stale {
        /// The image.
        image: PathBuf,
        /// What differs.
        problem: String,
    },
    /// Reading the bundle or writing the temp rest.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The reference does not parse.
    #[error("{reference}: not an image reference ({message}); give registry/repository:tag")]
    Reference {
        /// As given.
        reference: String,
        /// Why.
        message: String,
    },
    /// Credentials could not be read.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The registry refused or failed.
    #[error("pushing to {reference}: {what}: {message}")]
    Registry {
        /// Where.
        reference: String,
        /// Which step.
        what: String,
        /// The error and its causes.
        message: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PushError + '_ {
    move |source| PushError::Io { path: path.to_path_buf(), source }
}

/// Pushes the bundle in `opts.out` as a release to `opts.reference`.
pub async fn push(opts: &PushOptions) -> Result<PushReport, PushError> {
    let image_path = opts.out.join(format!("preseed.{}", Format::Erofs.extension()));
    if !image_path.is_file() {
        let squashfs = opts.out.join(format!("preseed.{}", Format::Squashfs.extension())).is_file();
        return Err(PushError::NoImage {
            out: opts.out.clone(),
            squashfs: if squashfs { " (only a squashfs image, which a pull cannot rebuild from blobs)" } else { "" },
        });
    }
    let plan_path = opts.out.join(PLAN_FILE);
    let bytes = match std::fs::read(&plan_path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(PushError::NoPlan { path: plan_path }),
        Err(e) => return Err(io_err(&plan_path)(e)),
    };
    let mut plan = Plan::parse(&bytes).map_err(|source| PushError::Plan { path: plan_path.clone(), source })?;
    let reference: oci_client::Reference = opts.reference.parse().map_err(|e: oci_client::ParseError| {
        PushError::Reference { reference: opts.reference.clone(), message: e.to_string() }
    })?;

    let image = Arc::new(File::open(&image_path).map_err(io_err(&image_path))?);
    let size = image.metadata().map_err(io_err(&image_path))?.len();
    if size != plan.image_bytes() {
        return Err(PushError::Stale {
            image: image_path,
            problem: format!("{size} bytes, the plan says {}", plan.image_bytes()),
        });
    }
    // The rest and the image's sha256 in one pass, the blobs checked on the
    // other cores meanwhile.
    let rest_file = tempfile::tempfile_in(&opts.out).map_err(io_err(&opts.out))?;
    let (scan, checked) = std::thread::scope(|s| {
        let check = s.spawn(|| check_blobs(&image, &plan));
        let scan = scan(&image, &plan, &rest_file);
        (scan, check.join().unwrap_or_else(|_| Err("a hashing thread panicked".into())))
    });
    let (sha256, rest) = scan.map_err(io_err(&image_path))?;
    checked.map_err(|problem| PushError::Stale { image: image_path.clone(), problem })?;
    plan.image = Some(ImageProof { size, sha256 });
    plan.rest = Some(rest.clone());
    let plan_json = plan.to_json();
    let rest_file = Arc::new(rest_file);

    let client = distribution::client(opts.insecure);
    let registry_err = |what: &str, e: OciDistributionError| PushError::Registry {
        reference: opts.reference.clone(),
        what: what.to_string(),
        message: distribution::chain(&e),
    };
    let auth = distribution::credentials(reference.resolve_registry())?;
    client.auth(&reference, &auth, RegistryOperation::Push).await.map_err(|e| registry_err("signing in", e))?;

    let mut report = PushReport {
        reference: opts.reference.clone(),
        digest: Digest::of(b""),
        blobs: Counts::default(),
        bytes: Counts::default(),
    };
    // The rest, then every blob, then the plan: layers before the config
    // and the manifest, so a reader never finds a release with parts missing.
    let mut uploads: Vec<(Digest, u64, Source)> = vec![(rest.digest.clone(), rest.size, Source::Whole(rest_file))];
    for (i, blob) in plan.blobs.iter().enumerate() {
        let pieces = plan.pieces.iter().filter(|p| p.blob as usize == i).map(|p| (p.at, p.len)).collect();
        uploads.push((blob.digest.clone(), blob.size, Source::Pieces(image.clone(), pieces)));
    }
    let plan_digest = Digest::of(&plan_json);
    uploads.push((plan_digest.clone(), plan_json.len() as u64, Source::Bytes(plan_json.clone().into())));
    let sources = mount_sources(&opts.out, &reference);
    'upload: for (digest, size, source) in uploads {
        let what = format!("blob {digest}");
        let digest_text = digest.to_string();
        let present = distribution::retry(|| client.blob_exists(&reference, &digest_text))
            .await
            .map_err(|e| registry_err(&what, e))?;
        if present {
            report.blobs.present += 1;
            report.bytes.present += size;
            continue;
        }
        // An image's own repository on the same registry: mounted, not sent.
        for from in sources.get(&digest).into_iter().flatten().take(2) {
            if client.mount_blob(&reference, from, &digest_text).await.is_ok() {
                report.blobs.mounted += 1;
                report.bytes.mounted += size;
                continue 'upload;
            }
        }
        distribution::retry(|| client.push_blob_stream(&reference, source.stream(), &digest_text, Some(size)))
            .await
            .map_err(|e| registry_err(&what, e))?;
        report.blobs.uploaded += 1;
        report.bytes.uploaded += size;
    }

    let descriptor = |media_type: &str, digest: &Digest, size: u64| serde_json::json!({ "mediaType": media_type, "digest": digest.to_string(), "size": size });
    let mut layers = vec![descriptor(REST_MEDIA_TYPE, &rest.digest, rest.size)];
    layers.extend(plan.blobs.iter().map(|b| descriptor(BLOB_MEDIA_TYPE, &b.digest, b.size)));
    // serde_json's maps are sorted: the same release gives the same bytes.
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": crate::oci::OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": descriptor(PLAN_MEDIA_TYPE, &plan_digest, plan_json.len() as u64),
        "layers": layers,
        "annotations": { "org.opencontainers.image.version": plan.writer },
    }))
    .unwrap_or_default();
    let content_type = hyper::header::HeaderValue::from_static(crate::oci::OCI_MANIFEST);
    distribution::retry(|| client.push_manifest_raw(&reference, manifest.clone(), content_type.clone()))
        .await
        .map_err(|e| registry_err("the release manifest", e))?;
    report.digest = Digest::of(&manifest);
    Ok(report)
}

/// For each blob, the repositories on `target`'s registry that hold it as
/// part of an image (from `preseed.json`'s image names and blob lists):
/// where a cross-repository mount can take it from.
fn mount_sources(out: &Path, target: &oci_client::Reference) -> HashMap<Digest, Vec<oci_client::Reference>> {
    let mut sources: HashMap<Digest, Vec<oci_client::Reference>> = HashMap::new();
    let Ok(index) =
        std::fs::read(out.join(INDEX_FILE)).map_err(|_| ()).and_then(|b| PartitionIndex::from_json(&b).map_err(|_| ()))
    else {
        return sources;
    };
    for image in &index.images {
        let Ok(name) = image.name.parse::<oci_client::Reference>() else { continue };
        if name.resolve_registry() != target.resolve_registry() || name.repository() == target.repository() {
            continue;
        }
        for blob in &image.blobs {
            let repos = sources.entry(blob.digest.clone()).or_default();
            if !repos.iter().any(|r| r.repository() == name.repository()) {
                repos.push(name.clone());
            }
        }
    }
    sources
}

/// Where an upload's bytes come from.
enum Source {
    /// A whole file (the rest).
    Whole(Arc<File>),
    /// Ranges `(offset, len)` of the image, in blob order.
    Pieces(Arc<File>, Vec<(u64, u64)>),
    /// In memory (the plan).
    Bytes(bytes::Bytes),
}

/// Bytes per chunk of an upload.
const CHUNK: u64 = 4 << 20;

impl Source {
    /// The bytes as a stream of chunks, each read when it is wanted.
    fn stream(&self) -> futures_util::stream::BoxStream<'static, Result<bytes::Bytes, OciDistributionError>> {
        use futures_util::StreamExt;
        let ranges: Vec<(Arc<File>, u64, u64)> = match self {
            Source::Bytes(b) => return futures_util::stream::once(futures_util::future::ready(Ok(b.clone()))).boxed(),
            Source::Whole(f) => {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                vec![(f.clone(), 0, len)]
            }
            Source::Pieces(f, pieces) => pieces.iter().map(|&(at, len)| (f.clone(), at, len)).collect(),
        };
        let chunks: Vec<(Arc<File>, u64, u64)> = ranges
            .into_iter()
            .flat_map(|(f, at, len)| {
                (0..len.div_ceil(CHUNK)).map(move |i| (f.clone(), at + i * CHUNK, CHUNK.min(len - i * CHUNK)))
            })
            .collect();
        futures_util::stream::iter(chunks)
            .then(|(f, at, len)| async move {
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len as usize];
                    f.read_exact_at(&mut buf, at).map(|()| bytes::Bytes::from(buf))
                })
                .await
                .map_err(|e| OciDistributionError::GenericError(Some(e.to_string())))?
                .map_err(OciDistributionError::IoError)
            })
            .boxed()
    }
}

/// One pass over the image: its sha256, and every byte outside the pieces
/// compressed into `rest_file`.
fn scan(image: &File, plan: &Plan, rest_file: &File) -> io::Result<(Digest, Rest)> {
    let mut whole = Hasher::new();
    let mut encoder = zstd::stream::write::Encoder::new(BufWriter::new(rest_file), 3)?;
    let mut reader = io::BufReader::with_capacity(1 << 20, image);
    let mut buf = vec![0u8; 1 << 20];
    let mut copy = |reader: &mut io::BufReader<&File>, mut len: u64, rest: bool| -> io::Result<()> {
        while len > 0 {
            let n = buf.len().min(len as usize);
            reader.read_exact(&mut buf[..n])?;
            whole.update(&buf[..n]);
            if rest {
                encoder.write_all(&buf[..n])?;
            }
            len -= n as u64;
        }
        Ok(())
    };
    let mut at = 0;
    for piece in &plan.pieces {
        copy(&mut reader, piece.at - at, true)?;
        copy(&mut reader, piece.len, false)?;
        at = piece.at + piece.len;
    }
    copy(&mut reader, plan.data_bytes - at, true)?;
    copy(&mut reader, plan.image_bytes() - plan.data_bytes, false)?;
    encoder.finish()?.flush()?;
    let mut rest_file = rest_file;
    let size = rest_file.seek(SeekFrom::End(0))?;
    rest_file.seek(SeekFrom::Start(0))?;
    let mut hasher = Hasher::new();
    io::copy(&mut rest_file, &mut hasher)?;
    let digest = hasher.finish();
    Ok((whole.finish(), Rest { digest, size, bytes: plan.rest_bytes() }))
}

/// Every blob's pieces, in blob order, hash to its digest (so the plan and
/// the image belong together), spread over the cores.
fn check_blobs(image: &File, plan: &Plan) -> Result<(), String> {
    let mut by_blob: Vec<Vec<(u64, u64, u64)>> = vec![Vec::new(); plan.blobs.len()];
    for p in &plan.pieces {
        by_blob[p.blob as usize].push((p.from, p.at, p.len));
    }
    let jobs: Vec<usize> = (0..plan.blobs.len()).collect();
    let results = crate::parallel::map(
        &jobs,
        |&i| plan.blobs[i].size,
        |&i| {
            let blob = &plan.blobs[i];
            let mut pieces = by_blob[i].clone();
            pieces.sort();
            let mut h = Hasher::new();
            let mut covered = 0;
            let mut buf = vec![0u8; 1 << 20];
            for (from, at, len) in pieces {
                if from != covered {
                    return Err(format!("blob {} has a gap at byte {covered}", blob.digest));
                }
                let mut done = 0;
                while done < len {
                    let n = buf.len().min((len - done) as usize);
                    image.read_exact_at(&mut buf[..n], at + done).map_err(|e| e.to_string())?;
                    h.update(&buf[..n]);
                    done += n as u64;
                }
                covered += len;
            }
            let found = h.finish();
            if covered != blob.size || found != blob.digest {
                return Err(format!("blob {} reads as {found} ({covered} of {} bytes)", blob.digest, blob.size));
            }
            Ok(())
        },
    );
    results.into_iter().collect()
}
