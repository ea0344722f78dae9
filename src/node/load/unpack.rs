//! `--unpack`: apply the host platform's layers into the snapshotter, so the
//! first container start does no unpacking — the way containerd's own
//! unpacker does it over the snapshot and diff services: one committed
//! snapshot per chain ID, then GC labels from the config to the top snapshot
//! and from each layer to its uncompressed digest.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::containerd::{describe, Client};
use crate::digest::Digest;
use crate::node::read::archive::Archive;
use crate::node::read::image::{ArchiveImage, PlatformManifest};
use crate::node::sys::{Linux, Sys as _};
use crate::oci::Platform;

/// Why unpacking failed.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The host manifest's config cannot be had or read.
    #[error("config {digest}: {why}")]
    Config {
        /// The config's digest.
        digest: Digest,
        /// What is wrong.
        why: String,
    },
    /// The config's layers and the manifest's do not match.
    #[error("config {digest} lists {diff_ids} diff_ids for {layers} layers")]
    DiffIds {
        /// The config's digest.
        digest: Digest,
        /// How many it lists.
        diff_ids: usize,
        /// How many layers the manifest has.
        layers: usize,
    },
    /// A layer does not unpack to what the config says.
    #[error("layer {layer} unpacks to {found}, config says {expected}")]
    Layer {
        /// The layer.
        layer: Digest,
        /// What it unpacked to.
        found: String,
        /// The config's diff_id.
        expected: Digest,
    },
    /// The unpacked files could not be flushed to disk.
    #[error("flushing {}: {source}", dir.display())]
    Flush {
        /// The snapshot's directory.
        dir: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// containerd refused a call.
    #[error("{op}: {message}")]
    Containerd {
        /// The call.
        op: &'static str,
        /// containerd's answer, described.
        message: String,
    },
}

/// What unpacking an image needs: its host manifest, its layers' diff IDs
/// and chain IDs. Found by [`plan`]; carried out by [`apply`].
pub struct Plan<'a> {
    manifest: &'a PlatformManifest,
    diff_ids: Vec<Digest>,
    chains: Vec<Digest>,
}

#[derive(Deserialize)]
struct Config {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    rootfs: Rootfs,
}

#[derive(Deserialize)]
struct Rootfs {
    diff_ids: Vec<Digest>,
}

/// Chain IDs of a layer stack: `chain[0] = diff[0]`,
/// `chain[i] = sha256(chain[i-1] + " " + diff[i])`.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => Digest::of(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

fn host_manifest<'a>(
    ai: &'a ArchiveImage,
    archive: &Archive,
) -> Result<Option<(&'a PlatformManifest, Config)>, UnpackError> {
    let host = Platform::host();
    for m in &ai.manifests {
        if let Some(p) = &m.descriptor.platform {
            if !(p.os == host.os && p.architecture == host.architecture) {
                continue;
            }
        }
        let bad = |why: String| UnpackError::Config { digest: m.config.digest.clone(), why };
        // Untrusted like any blob: capped, and checked against its digest before it is parsed.
        let bytes = archive
            .read(&m.config.digest.layout_path(), crate::node::read::image::MAX_JSON)
            .map_err(|e| bad(e.to_string()))?;
        let found = Digest::of(&bytes);
        if found != m.config.digest {
            return Err(bad(format!("its bytes hash to {found}")));
        }
        let config: Config = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if (config.os.is_empty() || config.os == host.os)
            && (config.architecture.is_empty() || config.architecture == host.architecture)
        {
            return Ok(Some((m, config)));
        }
    }
    Ok(None)
}

fn grpc(op: &'static str) -> impl Fn(tonic::Status) -> UnpackError {
    move |s| UnpackError::Containerd { op, message: describe(&s) }
}

fn gc_key(snapshotter: &str) -> String {
    format!("containerd.io/gc.ref.snapshot.{snapshotter}")
}

/// What unpacking the host platform's manifest of `ai` would do, or `None`
/// if it is unpacked already (top snapshot there, config labelled) or the
/// image has no manifest for this host. Reads only.
pub async fn plan<'a>(
    c: &Client,
    ns: &str,
    snapshotter: &str,
    archive: &Archive,
    ai: &'a ArchiveImage,
) -> Result<Option<Plan<'a>>, UnpackError> {
    let Some((manifest, config)) = host_manifest(ai, archive)? else { return Ok(None) };
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(UnpackError::DiffIds {
            digest: manifest.config.digest.clone(),
            diff_ids: config.rootfs.diff_ids.len(),
            layers: manifest.layers.len(),
        });
    }
    let chains = chain_ids(&config.rootfs.diff_ids);
    let Some(top) = chains.last() else { return Ok(None) };
    let top_done = c.snapshot_exists(ns, snapshotter, &top.to_string()).await.map_err(grpc("snapshot stat"))?;
    let config_labels = c.content_labels(ns, &manifest.config.digest).await.map_err(grpc("content info"))?;
    let labelled = config_labels.as_ref().and_then(|l| l.get(&gc_key(snapshotter))) == Some(&top.to_string());
    if top_done && labelled {
        return Ok(None);
    }
    Ok(Some(Plan { manifest, diff_ids: config.rootfs.diff_ids, chains }))
}

/// Unpacks per `plan` under `lease`: one committed snapshot per chain ID
/// (active ones named `<key_prefix> <chain>`), then the GC labels.
pub async fn apply(
    c: &Client,
    ns: &str,
    snapshotter: &str,
    lease: &str,
    key_prefix: &str,
    plan: Plan<'_>,
) -> Result<(), UnpackError> {
    let sn = snapshotter;
    let mut parent = String::new();
    for ((layer, diff_id), chain) in plan.manifest.layers.iter().zip(&plan.diff_ids).zip(&plan.chains) {
        let name = chain.to_string();
        if !c.snapshot_exists(ns, sn, &name).await.map_err(grpc("snapshot stat"))? {
            let key = format!("{key_prefix} {name}");
            let mounts = c.snapshot_prepare(ns, lease, sn, &key, &parent).await.map_err(grpc("snapshot prepare"))?;
            let written = written_dir(&mounts);
            let applied = c.diff_apply(ns, layer, mounts).await;
            let result = match applied {
                Ok(d) if d == diff_id.to_string() => match flush(written).await {
                    Ok(()) => c.snapshot_commit(ns, lease, sn, &name, &key).await.map_err(grpc("snapshot commit")),
                    Err(e) => Err(e),
                },
                Ok(d) => Err(UnpackError::Layer { layer: layer.digest.clone(), found: d, expected: diff_id.clone() }),
                Err(s) => Err(grpc("diff apply")(s)),
            };
            if let Err(e) = result {
                let _ = c.snapshot_remove(ns, sn, &key).await;
                return Err(e);
            }
        }
        let mut labels = BTreeMap::new();
        labels.insert("containerd.io/uncompressed".to_string(), diff_id.to_string());
        c.content_set_labels(ns, &layer.digest, &labels).await.map_err(grpc("content update"))?;
        parent = name;
    }
    let top = plan.chains.last().map(Digest::to_string).unwrap_or_default();
    let mut labels = BTreeMap::new();
    labels.insert(gc_key(sn), top);
    c.content_set_labels(ns, &plan.manifest.config.digest, &labels).await.map_err(grpc("content update"))?;
    Ok(())
}

/// The directory an apply onto `mounts` writes into: a bind mount's source
/// (the first layer) or an overlay's `upperdir`.
fn written_dir(mounts: &[containerd_client::types::Mount]) -> Option<PathBuf> {
    mounts.iter().find_map(|m| match m.r#type.as_str() {
        "bind" => Some(PathBuf::from(&m.source)),
        "overlay" => m.options.iter().find_map(|o| o.strip_prefix("upperdir=")).map(PathBuf::from),
        _ => None,
    })
}

/// Flushes the filesystem of `dir` before its snapshot is committed.
/// containerd fsyncs its database at the commit but never the unpacked
/// files (before 2.0, and from 2.0 only with `sync_fs`): after a power cut
/// the snapshot is recorded whole while its files are empty, and a
/// sandbox or container started from it fails on every later boot (the
/// power-cut VM test found it). A directory we cannot see (containerd in
/// another mount namespace) is left to containerd's own `sync_fs`.
async fn flush(dir: Option<PathBuf>) -> Result<(), UnpackError> {
    let Some(dir) = dir.filter(|d| d.is_absolute()) else { return Ok(()) };
    tokio::task::spawn_blocking(move || match std::fs::File::open(&dir) {
        Ok(f) => Linux.sync_fs(&f).map_err(|source| UnpackError::Flush { dir, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(UnpackError::Flush { dir, source }),
    })
    .await
    .unwrap_or(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let b: Digest = format!("sha256:{}", "b".repeat(64)).parse().unwrap();
        let chains = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chains[0], a);
        assert_eq!(chains[1], Digest::of(format!("{a} {b}").as_bytes()));
    }
}
