//! `--unpack`: apply the host platform's layers into the snapshotter, so the
//! first container start does no unpacking — the way containerd's own
//! unpacker does it over the snapshot and diff services: one committed
//! snapshot per chain ID, then GC labels from the config to the top snapshot
//! and from each layer to its uncompressed digest.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::archive::Archive;
use super::image::{ArchiveImage, PlatformManifest};
use super::import::{Context, ImportError};
use crate::digest::Digest;
use crate::oci::Platform;

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
) -> Result<Option<(&'a PlatformManifest, Config)>, ImportError> {
    let host = Platform::host();
    for m in &ai.manifests {
        if let Some(p) = &m.descriptor.platform {
            if !(p.os == host.os && p.architecture == host.architecture) {
                continue;
            }
        }
        let entry = archive
            .blob(&m.config.digest)
            .ok_or_else(|| ImportError::Unpack(format!("config {} not in the archive", m.config.digest)))?;
        let bytes = archive.read_entry(entry).map_err(|e| ImportError::Unpack(e.to_string()))?;
        let config: Config = serde_json::from_slice(&bytes)
            .map_err(|e| ImportError::Unpack(format!("config {}: {e}", m.config.digest)))?;
        if (config.os.is_empty() || config.os == host.os)
            && (config.architecture.is_empty() || config.architecture == host.architecture)
        {
            return Ok(Some((m, config)));
        }
    }
    Ok(None)
}

/// Unpacks the host platform's manifest of `ai`; `Ok(false)` if it was
/// unpacked already or the image has no manifest for this host.
pub async fn unpack(ctx: &Context, ns: &str, archive: &Archive, ai: &ArchiveImage) -> Result<bool, ImportError> {
    let Some((manifest, config)) = host_manifest(ai, archive)? else { return Ok(false) };
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(ImportError::Unpack(format!(
            "config {} lists {} diff_ids for {} layers",
            manifest.config.digest,
            config.rootfs.diff_ids.len(),
            manifest.layers.len()
        )));
    }
    let c = ctx.client();
    let sn = ctx.snapshotter();
    let chains = chain_ids(&config.rootfs.diff_ids);
    let Some(top) = chains.last() else { return Ok(false) };
    let gc_key = format!("containerd.io/gc.ref.snapshot.{sn}");
    let grpc = |op: &'static str| move |s: tonic::Status| ImportError::Unpack(format!("{op}: {}", s.message()));
    let top_done = c.snapshot_exists(ns, sn, &top.to_string()).await.map_err(grpc("snapshot stat"))?;
    let config_labels = c.content_labels(ns, &manifest.config.digest).await.map_err(grpc("content info"))?;
    let labelled = config_labels.as_ref().and_then(|l| l.get(&gc_key)) == Some(&top.to_string());
    if top_done && labelled {
        return Ok(false);
    }
    let lease = ctx.lease(ns).await?;
    let mut parent = String::new();
    for ((layer, diff_id), chain) in manifest.layers.iter().zip(&config.rootfs.diff_ids).zip(&chains) {
        let name = chain.to_string();
        if !c.snapshot_exists(ns, sn, &name).await.map_err(grpc("snapshot stat"))? {
            let key = format!("extract-{}-{} {name}", std::process::id(), ctx.unique());
            let mounts = c.snapshot_prepare(ns, &lease, sn, &key, &parent).await.map_err(grpc("snapshot prepare"))?;
            let applied = c.diff_apply(ns, layer, mounts).await;
            let result = match applied {
                Ok(d) if d == diff_id.to_string() => {
                    c.snapshot_commit(ns, &lease, sn, &name, &key).await.map_err(grpc("snapshot commit"))
                }
                Ok(d) => {
                    Err(ImportError::Unpack(format!("layer {} unpacks to {d}, config says {diff_id}", layer.digest)))
                }
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
    let mut labels = BTreeMap::new();
    labels.insert(gc_key, top.to_string());
    c.content_set_labels(ns, &manifest.config.digest, &labels).await.map_err(grpc("content update"))?;
    Ok(true)
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
