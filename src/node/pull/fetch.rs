//! The registry side of a pull: the release manifest, and blobs into the
//! work directory — each downloaded to `<hex>.part`, resumed with `Range`
//! after an interruption, hashed whole and renamed to `<hex>` only when it
//! matches its digest. Nothing else here writes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use oci_client::client::BlobResponse;
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::RegistryOperation;
use serde::Deserialize;

use super::{Counts, PullError};
use crate::digest::{Digest, Hasher};
use crate::distribution;
use crate::oci::OCI_MANIFEST;

/// Largest release manifest accepted (a layer descriptor is ~150 bytes).
const MAX_MANIFEST: usize = 16 << 20;

/// The work directory: `manifests/<hex>`, `blobs/<hex>`, `blobs/<hex>.part`.
pub(super) struct Work {
    pub(super) dir: PathBuf,
}

impl Work {
    pub(super) fn blob(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join(digest.hex())
    }

    fn part(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join(format!("{}.part", digest.hex()))
    }

    fn manifest(&self, digest: &Digest) -> PathBuf {
        self.dir.join("manifests").join(digest.hex())
    }

    pub(super) fn create(&self) -> Result<(), PullError> {
        for sub in ["blobs", "manifests"] {
            let d = self.dir.join(sub);
            fs::create_dir_all(&d).map_err(|source| PullError::Work { path: d, source })?;
        }
        Ok(())
    }
}

/// A release manifest, as far as a pull reads it.
#[derive(Debug, Deserialize)]
pub(super) struct Manifest {
    #[serde(rename = "artifactType", default)]
    pub(super) artifact_type: Option<String>,
    pub(super) config: Descriptor,
    pub(super) layers: Vec<Descriptor>,
}

/// A descriptor of the manifest.
#[derive(Clone, Debug, Deserialize)]
pub(super) struct Descriptor {
    #[serde(rename = "mediaType")]
    pub(super) media_type: String,
    pub(super) digest: Digest,
    pub(super) size: u64,
}

/// The registry, connected lazily: a pull with everything local never
/// opens a connection.
pub(super) struct Remote {
    pub(super) text: String,
    reference: oci_client::Reference,
    client: oci_client::Client,
    auth: Option<RegistryAuth>,
}

impl Remote {
    pub(super) fn new(text: &str, insecure: bool) -> Result<Remote, PullError> {
        let reference: oci_client::Reference = text.parse().map_err(|e: oci_client::ParseError| {
            PullError::Reference { reference: text.to_string(), message: e.to_string() }
        })?;
        Ok(Remote { text: text.to_string(), reference, client: distribution::client(insecure), auth: None })
    }

    /// The digest the reference pins, if it does.
    pub(super) fn pinned(&self) -> Option<Result<Digest, PullError>> {
        self.reference.digest().map(|d| {
            d.parse().map_err(|_| PullError::Reference {
                reference: self.text.clone(),
                message: format!("{d} is not a sha256 digest"),
            })
        })
    }

    fn err(&self, what: &str, e: OciDistributionError) -> PullError {
        let mut message = distribution::chain(&e);
        let unknown = matches!(&e, OciDistributionError::ImageManifestNotFoundError(_))
            || matches!(&e, OciDistributionError::ServerError { code: 404, .. })
            || message.contains("manifest unknown")
            || message.contains("blob unknown");
        if unknown {
            message.push_str(
                ": the registry has no such release (check the repository and tag; `preseed push` prints the digest)",
            );
        } else if matches!(&e, OciDistributionError::RequestError(r) if r.is_connect()) {
            message.push_str(": the registry is not reachable (a pinned @sha256 reference pulled before, with --from, needs no registry)");
        }
        PullError::Registry { reference: self.text.clone(), what: what.to_string(), message }
    }

    async fn connect(&mut self) -> Result<(), PullError> {
        if self.auth.is_none() {
            let auth = distribution::credentials(self.reference.resolve_registry())?;
            self.client
                .auth(&self.reference, &auth, RegistryOperation::Pull)
                .await
                .map_err(|e| self.err("signing in", e))?;
            self.auth = Some(auth);
        }
        Ok(())
    }

    /// The release manifest: from the work directory when the reference
    /// pins a digest it holds, else from the registry (kept there by digest).
    pub(super) async fn manifest(
        &mut self,
        work: &Work,
        plan_bytes: &mut u64,
    ) -> Result<(Digest, Manifest), PullError> {
        let pinned = self.pinned().transpose()?;
        let local = pinned.as_ref().map(|d| work.manifest(d)).filter(|p| p.is_file());
        let (digest, bytes) = match (pinned, local) {
            (Some(digest), Some(path)) => {
                let bytes = fs::read(&path).map_err(|source| PullError::Work { path: path.clone(), source })?;
                if Digest::of(&bytes) != digest {
                    let _ = fs::remove_file(&path);
                    return Err(PullError::Work {
                        path,
                        source: io::Error::other("kept manifest does not match its name; removed, run again"),
                    });
                }
                (digest, bytes)
            }
            (pinned, _) => {
                self.connect().await?;
                let auth = self.auth.clone().unwrap_or(RegistryAuth::Anonymous);
                let (bytes, _) =
                    distribution::retry(|| self.client.pull_manifest_raw(&self.reference, &auth, &[OCI_MANIFEST]))
                        .await
                        .map_err(|e| self.err("the release manifest", e))?;
                if bytes.len() > MAX_MANIFEST {
                    return Err(PullError::NotRelease {
                        reference: self.text.clone(),
                        why: format!("its manifest is {} bytes", bytes.len()),
                    });
                }
                let digest = Digest::of(&bytes);
                if let Some(p) = pinned {
                    if p != digest {
                        return Err(PullError::Registry {
                            reference: self.text.clone(),
                            what: "the release manifest".into(),
                            message: format!("the registry served {digest} for {p}"),
                        });
                    }
                }
                *plan_bytes += bytes.len() as u64;
                let path = work.manifest(&digest);
                write_atomically(&path, &bytes).map_err(|source| PullError::Work { path, source })?;
                (digest, bytes.to_vec())
            }
        };
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| PullError::NotRelease {
            reference: self.text.clone(),
            why: format!("its manifest does not parse ({e})"),
        })?;
        Ok((digest, manifest))
    }

    /// Blob `digest` of `size` bytes in the work directory, fetched if it
    /// is not there yet (resuming a `.part`), verified. Counts bytes fetched
    /// and bytes found already there (`skipped`).
    pub(super) async fn blob(
        &mut self,
        work: &Work,
        digest: &Digest,
        size: u64,
        counts: &mut Counts,
        progress: &dyn Fn(u64),
    ) -> Result<PathBuf, PullError> {
        let done = work.blob(digest);
        if fs::metadata(&done).map(|m| m.len() == size).unwrap_or(false) {
            counts.skipped_bytes += size;
            counts.skipped += 1;
            return Ok(done);
        }
        let part = work.part(digest);
        let work_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PullError::Work { path, source }
        };
        let mut had = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if had > size {
            had = 0;
        }
        // Bytes an earlier, interrupted pull left: not fetched again.
        let initial = had;
        let mut mismatches = 0;
        let mut failures = 0;
        loop {
            let mut file = OpenOptions::new().create(true).append(true).open(&part).map_err(work_err(&part))?;
            file.set_len(had).map_err(work_err(&part))?;
            if had < size {
                self.connect().await?;
                match self.download(&mut file, digest, had, size, counts, progress).await {
                    Ok(()) => {}
                    Err(e) if distribution::is_transient(&e) && failures + 1 < distribution::ATTEMPTS => {
                        // Keep what arrived; the next try asks for the rest.
                        failures += 1;
                        file.sync_data().map_err(work_err(&part))?;
                        had = fs::metadata(&part).map(|m| m.len()).unwrap_or(0).min(size);
                        tokio::time::sleep(std::time::Duration::from_millis(200 << failures)).await;
                        continue;
                    }
                    Err(e) => return Err(self.err(&format!("blob {digest}"), e)),
                }
            }
            let found = hash_file(&part).map_err(work_err(&part))?;
            if &found == digest {
                if mismatches == 0 {
                    counts.skipped_bytes += initial;
                }
                file.sync_all().map_err(work_err(&part))?;
                fs::rename(&part, &done).map_err(work_err(&done))?;
                return Ok(done);
            }
            // Bytes that are not the blob: never kept, fetched once more.
            let _ = fs::remove_file(&part);
            counts.refetched += 1;
            mismatches += 1;
            if mismatches == 2 {
                return Err(PullError::BadBlob { reference: self.text.clone(), digest: digest.clone(), found });
            }
            had = 0;
        }
    }

    /// Appends bytes `had..size` of the blob to `file`.
    async fn download(
        &self,
        file: &mut File,
        digest: &Digest,
        had: u64,
        size: u64,
        counts: &mut Counts,
        progress: &dyn Fn(u64),
    ) -> Result<(), OciDistributionError> {
        let digest_text = digest.to_string();
        let response = self.client.pull_blob_stream_partial(&self.reference, digest_text.as_str(), had, None).await?;
        let (mut stream, mut at) = match response {
            BlobResponse::Partial(s) => (s, had),
            // The registry ignored the range: start over.
            BlobResponse::Full(s) => {
                file.set_len(0)?;
                (s, 0)
            }
        };
        while let Some(chunk) = stream.stream.next().await {
            let chunk = chunk.map_err(OciDistributionError::IoError)?;
            if at + chunk.len() as u64 > size {
                return Err(OciDistributionError::GenericError(Some(format!(
                    "the registry sent more than the {size} bytes of {digest}"
                ))));
            }
            file.write_all(&chunk)?;
            at += chunk.len() as u64;
            counts.fetched_bytes += chunk.len() as u64;
            progress(chunk.len() as u64);
        }
        if at != size {
            return Err(OciDistributionError::IoError(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{digest} ended after {at} of {size} bytes"),
            )));
        }
        counts.fetched += 1;
        Ok(())
    }
}

/// sha256 of a file.
pub(super) fn hash_file(path: &Path) -> io::Result<Digest> {
    let mut h = Hasher::new();
    io::copy(&mut File::open(path)?, &mut h)?;
    Ok(h.finish())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}
