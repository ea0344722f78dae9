//! What the registry serves: every image of the source under each of its
//! names' repositories, and where each blob's bytes lie — a tarball and an
//! offset into it (or, for a synthesized docker-save manifest, the bytes
//! themselves). Built once at start; nothing is copied or staged.
//!
//! A name `host/repo:tag` puts the image under repository `repo` of registry
//! `host`, with tag `tag`. Several registries may hold the same repository
//! name; a request says which with containerd's `?ns=<host>` mirror
//! parameter, or by prefixing the host to the repository
//! (`/v2/<host>/<repo>/…`, for clients that cannot add a parameter). A
//! request naming neither gets the tags of `docker.io` if it is among them
//! (the default registry, what a plain docker mirror is asked for), else of
//! the host that sorts first; a digest is found under any of them.
//!
//! What refers to an image (its signatures, attestations and SBOMs, which
//! `preseed.json` lists and its tarball holds outside `index.json`) is
//! served as the registry served it: through the referrers API, under
//! cosign's `sha256-<hex>.sig`/`.att`/`.sbom` tags, and under the referrers
//! tag `sha256-<hex>` (an index made here, for clients without the API).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::digest::Digest;
use crate::node::policy::Policy;
use crate::node::read::archive::Archive;
use crate::node::read::image::{self, BlobData};
use crate::node::read::source;
use crate::oci;

/// Why the catalog could not be built (problems with one tarball are
/// warnings instead: the others are still served).
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The source's contents could not be listed.
    #[error(transparent)]
    Source(#[from] source::SourceError),
    /// Nothing to serve.
    #[error("{0}: no image could be read (see the warnings above); nothing to serve")]
    Empty(PathBuf),
}

/// Why one tarball is not served (a warning: the others are).
#[derive(Debug, thiserror::Error)]
pub enum Unservable {
    /// The tarball cannot be read.
    #[error(transparent)]
    Archive(#[from] crate::node::read::archive::ArchiveError),
    /// Its images cannot be walked.
    #[error(transparent)]
    Image(#[from] image::ImageError),
    /// It holds another image than `preseed.json` pins.
    #[error("holds {holds}, but preseed.json pins {pinned}; rebuild the partition")]
    NotPinned {
        /// The image it holds.
        holds: Digest,
        /// The digest preseed.json names.
        pinned: Digest,
    },
}

/// Where a blob's bytes are.
#[derive(Clone, Debug)]
pub enum Data {
    /// In a tarball, from `offset`.
    File {
        /// The tarball, open.
        file: Arc<File>,
        /// Its path, for error messages.
        path: Arc<Path>,
        /// Offset of the first byte.
        offset: u64,
    },
    /// Bytes made at start (a docker-save archive's manifest).
    Inline(Arc<[u8]>),
}

/// One blob (index, manifest, config or layer).
#[derive(Clone, Debug)]
pub struct Content {
    /// Its media type as the parent descriptor says (the `Content-Type` of a manifest).
    pub media_type: String,
    /// Its size.
    pub size: u64,
    /// Where its bytes are.
    pub data: Data,
}

impl Content {
    /// Whether it is an index or manifest (servable under `/manifests/`).
    pub fn is_manifest(&self) -> bool {
        oci::is_index(&self.media_type) || oci::is_manifest(&self.media_type)
    }
}

/// One repository of one registry host.
#[derive(Clone, Debug, Default)]
pub struct Repository {
    /// Tag → root digest.
    pub tags: BTreeMap<String, Digest>,
    /// Every blob of every image under this repository.
    pub digests: HashSet<Digest>,
    /// Subject digest → what refers to it, in `preseed.json` order.
    pub referrers: BTreeMap<Digest, Vec<Referrer>>,
}

/// One entry of a referrers list.
#[derive(Clone, Debug)]
pub struct Referrer {
    /// Its `artifactType` (what `?artifactType=` filters on).
    pub artifact_type: Option<String>,
    /// The descriptor served: media type, digest, size, `artifactType` and
    /// the manifest's annotations, as the distribution spec asks.
    pub descriptor: serde_json::Value,
}

/// The body of a referrers answer (and of the `sha256-<hex>` tag): an OCI
/// index of `referrers`.
pub fn referrers_index<'a>(referrers: impl Iterator<Item = &'a Referrer>) -> Vec<u8> {
    let manifests: Vec<&serde_json::Value> = referrers.map(|r| &r.descriptor).collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_INDEX,
        "manifests": manifests,
    }))
    .expect("an index serializes")
}

/// Largest referrer manifest read at start (for its annotations).
const MAX_REFERRER_MANIFEST: u64 = 4 << 20;

/// Everything served.
#[derive(Debug, Default)]
pub struct Catalog {
    /// Repository name → registry host → repository.
    repos: BTreeMap<String, BTreeMap<String, Repository>>,
    blobs: HashMap<Digest, Content>,
    /// Images served (tarball images, not names).
    pub images: usize,
    /// Tarballs or names skipped, and tag conflicts, for the start-up log.
    pub warnings: Vec<String>,
}

/// `host/repo[:tag][@digest]` → (host, repo, tag). `None` for a name without
/// a host (the loader's names are normalized, so that is not one of ours).
pub fn split_name(name: &str) -> Option<(String, String, Option<String>)> {
    let name = image::normalize_name(name)?;
    let without_digest = name.split_once('@').map_or(name.as_str(), |(n, _)| n);
    let (host, rest) = without_digest.split_once('/')?;
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (repo, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(rest[last_slash + i + 1..].to_string())),
        None => (rest, None),
    };
    if host.is_empty() || repo.is_empty() {
        return None;
    }
    Some((canonical_host(host).to_string(), repo.to_string(), tag))
}

/// Docker Hub's other spellings are `docker.io`, as containerd names them.
fn canonical_host(host: &str) -> &str {
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        h => h,
    }
}

impl Catalog {
    /// Reads every tarball under `root` (a mounted partition or preload
    /// directory). One unreadable tarball is a warning, not a failure; so is
    /// an image `policy` refuses.
    pub fn build(root: &Path, policy: Option<&Policy>) -> Result<Catalog, CatalogError> {
        let mut listing = source::list(root)?;
        if let Some(policy) = policy {
            policy.screen(&mut listing);
        }
        let mut cat = Catalog { warnings: listing.warnings.clone(), ..Catalog::default() };
        cat.warnings.extend(listing.refused.iter().map(|r| format!("{r}; not served")));
        for src in &listing.images {
            if let Err(why) = cat.add_tarball(src) {
                cat.warnings.push(format!("{}: {why}; not served", src.rel));
            }
        }
        cat.add_referrers_tags();
        if cat.images == 0 && !(listing.images.is_empty() && listing.refused.is_empty()) {
            return Err(CatalogError::Empty(root.to_path_buf()));
        }
        Ok(cat)
    }

    fn add_tarball(&mut self, src: &source::SourceImage) -> Result<(), Unservable> {
        let archive = Archive::open(&src.path)?;
        let images = image::images(&archive)?;
        let path: Arc<Path> = Arc::from(src.path.as_path());
        for img in &images {
            // preseed.json's names are the image's names when the tarball
            // holds one image (as preseed's always do).
            let names = if images.len() == 1 && !src.names.is_empty() { &src.names } else { &img.names };
            if let Some(pinned) = &src.digest {
                if images.len() == 1 && *pinned != img.root.digest {
                    return Err(Unservable::NotPinned { holds: img.root.digest.clone(), pinned: pinned.clone() });
                }
            }
            let mut repos = Vec::new();
            for name in names {
                match split_name(name) {
                    Some(r) => repos.push(r),
                    None => self.warnings.push(format!("{}: name {name:?} is not host/repository[:tag]", src.rel)),
                }
            }
            if repos.is_empty() {
                self.warnings.push(format!("{}: image {} has no name; not served", src.rel, img.root.digest));
                continue;
            }
            for b in &img.blobs {
                let data = match &b.data {
                    BlobData::Entry(e) => {
                        Data::File { file: archive.file().clone(), path: path.clone(), offset: e.offset }
                    }
                    BlobData::Inline(bytes) => Data::Inline(bytes.clone()),
                };
                self.blobs.entry(b.descriptor.digest.clone()).or_insert_with(|| Content {
                    media_type: b.descriptor.media_type.clone(),
                    size: b.descriptor.size,
                    data,
                });
            }
            // The tarball's referrers belong to its one image.
            let referrers = if images.len() == 1 { self.add_referrers(src, &archive, &path) } else { Vec::new() };
            for (host, repo, tag) in repos {
                let r = self.repos.entry(repo.clone()).or_default().entry(host.clone()).or_default();
                r.digests.extend(img.blobs.iter().map(|b| b.descriptor.digest.clone()));
                for (subject, referrer, tag, digests) in &referrers {
                    r.digests.extend(digests.iter().cloned());
                    r.referrers.entry(subject.clone()).or_default().push(referrer.clone());
                    if let Some(tag) = tag {
                        r.tags.entry(tag.clone()).or_insert_with(|| digests[0].clone());
                    }
                }
                if let Some(tag) = tag {
                    match r.tags.get(&tag) {
                        Some(d) if *d != img.root.digest => self.warnings.push(format!(
                            "{}: {host}/{repo}:{tag} is {} here but {d} in an earlier tarball; serving {d}",
                            src.rel, img.root.digest
                        )),
                        Some(_) => {}
                        None => {
                            r.tags.insert(tag, img.root.digest.clone());
                        }
                    }
                }
            }
            self.images += 1;
        }
        Ok(())
    }

    /// The referrers `preseed.json` lists for the tarball `src`, their
    /// blobs added to the catalog: (subject, entry, cosign tag, digests
    /// with the manifest first). One whose manifest is missing or altered
    /// is a warning, and not served.
    fn add_referrers(
        &mut self,
        src: &source::SourceImage,
        archive: &Archive,
        path: &Arc<Path>,
    ) -> Vec<(Digest, Referrer, Option<String>, Vec<Digest>)> {
        let mut out = Vec::new();
        for r in &src.referrers {
            let manifest = archive
                .blob(&r.manifest.digest)
                .filter(|e| e.size == r.manifest.size && e.size <= MAX_REFERRER_MANIFEST)
                .and_then(|e| archive.read_entry(e).ok())
                .filter(|bytes| Digest::of(bytes) == r.manifest.digest);
            let Some(manifest) = manifest else {
                self.warnings.push(format!(
                    "{}: {} {} of {} is missing or altered; not served",
                    src.rel,
                    r.kind.plural().trim_end_matches('s'),
                    r.manifest.digest,
                    r.subject
                ));
                continue;
            };
            let annotations = serde_json::from_slice::<serde_json::Value>(&manifest)
                .ok()
                .and_then(|m| m.get("annotations").filter(|a| a.is_object()).cloned());
            let mut descriptor = serde_json::json!({
                "mediaType": r.media_type,
                "digest": r.manifest.digest,
                "size": r.manifest.size,
            });
            if let Some(t) = &r.artifact_type {
                descriptor["artifactType"] = t.clone().into();
            }
            if let Some(a) = annotations {
                descriptor["annotations"] = a;
            }
            let file = |e: crate::node::read::archive::Entry| Data::File {
                file: archive.file().clone(),
                path: path.clone(),
                offset: e.offset,
            };
            let mut digests = vec![r.manifest.digest.clone()];
            if let Some(e) = archive.blob(&r.manifest.digest) {
                self.blobs.entry(r.manifest.digest.clone()).or_insert_with(|| Content {
                    media_type: r.media_type.clone(),
                    size: r.manifest.size,
                    data: file(e),
                });
            }
            for b in &r.blobs {
                let Some(e) = archive.blob(&b.digest).filter(|e| e.size == b.size) else { continue };
                digests.push(b.digest.clone());
                self.blobs.entry(b.digest.clone()).or_insert_with(|| Content {
                    media_type: "application/octet-stream".into(),
                    size: b.size,
                    data: file(e),
                });
            }
            let referrer = Referrer { artifact_type: r.artifact_type.clone(), descriptor };
            out.push((r.subject.clone(), referrer, r.tag.clone(), digests));
        }
        out
    }

    /// Makes the referrers tag `sha256-<hex>` of every subject that has
    /// referrers and no such tag yet: an index of them, as a registry
    /// without the referrers API holds it.
    fn add_referrers_tags(&mut self) {
        let mut made = Vec::new();
        for hosts in self.repos.values_mut() {
            for r in hosts.values_mut() {
                for (subject, list) in &r.referrers {
                    let tag = format!("sha256-{}", subject.hex());
                    if r.tags.contains_key(&tag) {
                        continue;
                    }
                    let bytes = referrers_index(list.iter());
                    let digest = Digest::of(&bytes);
                    r.tags.insert(tag, digest.clone());
                    r.digests.insert(digest.clone());
                    made.push((digest, bytes));
                }
            }
        }
        for (digest, bytes) in made {
            self.blobs.entry(digest).or_insert_with(|| Content {
                media_type: oci::OCI_INDEX.into(),
                size: bytes.len() as u64,
                data: Data::Inline(Arc::from(bytes)),
            });
        }
    }

    /// What refers to `subject` in `repos` (the first repository that has
    /// any), filtered by `artifact_type` when given.
    pub fn referrers<'a>(
        &self,
        repos: &[&'a Repository],
        subject: &Digest,
        artifact_type: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Referrer> + 'a {
        repos
            .iter()
            .find_map(|r| r.referrers.get(subject))
            .into_iter()
            .flatten()
            .filter(move |r| artifact_type.is_none_or(|t| r.artifact_type.as_deref() == Some(t)))
    }

    /// The repositories a request for `name` may mean, the one whose tags
    /// count first: `name` under the registry `ns` (containerd's mirror
    /// parameter) if given; else `name` under `docker.io` or the first host
    /// that has it, then its other hosts (a digest is the same content
    /// wherever it is found); else, if `name` starts with a known registry
    /// host, the rest under that host. Empty: no such repository.
    pub fn repositories(&self, name: &str, ns: Option<&str>) -> Vec<&Repository> {
        if let Some(ns) = ns {
            return self.repos.get(name).and_then(|hosts| hosts.get(canonical_host(ns))).into_iter().collect();
        }
        if let Some(hosts) = self.repos.get(name) {
            let mut all: Vec<(&String, &Repository)> = hosts.iter().collect();
            // Stable: docker.io first, then the others in host order.
            all.sort_by_key(|(host, _)| host.as_str() != "docker.io");
            return all.into_iter().map(|(_, r)| r).collect();
        }
        let Some((host, rest)) = name.split_once('/') else { return Vec::new() };
        self.repos.get(rest).and_then(|hosts| hosts.get(canonical_host(host))).into_iter().collect()
    }

    /// A blob of one of `repos`.
    pub fn content(&self, repos: &[&Repository], digest: &Digest) -> Option<&Content> {
        if repos.iter().any(|r| r.digests.contains(digest)) {
            self.blobs.get(digest)
        } else {
            None
        }
    }

    /// Every repository name, sorted (each once, whatever its hosts).
    pub fn repository_names(&self) -> impl Iterator<Item = &str> {
        self.repos.keys().map(String::as_str)
    }

    /// Number of distinct (host, repository) pairs.
    pub fn repository_count(&self) -> usize {
        self.repos.values().map(BTreeMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_into_host_repo_and_tag() {
        let s = |n: &str| split_name(n).map(|(h, r, t)| (h, r, t.unwrap_or_default()));
        assert_eq!(
            s("docker.io/library/busybox:1.36"),
            Some(("docker.io".into(), "library/busybox".into(), "1.36".into()))
        );
        assert_eq!(s("busybox"), Some(("docker.io".into(), "library/busybox".into(), "latest".into())));
        assert_eq!(s("127.0.0.1:5000/a/b:v1"), Some(("127.0.0.1:5000".into(), "a/b".into(), "v1".into())));
        assert_eq!(s("localhost:5000/a"), Some(("localhost:5000".into(), "a".into(), "latest".into())));
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(s(&format!("quay.io/x/y@{d}")), Some(("quay.io".into(), "x/y".into(), String::new())));
        assert_eq!(s(&format!("quay.io/x/y:1@{d}")), Some(("quay.io".into(), "x/y".into(), "1".into())));
        assert_eq!(s("index.docker.io/library/a:1").map(|x| x.0), Some("docker.io".into()));
    }

    fn repo_with_tag(tag: &str) -> Repository {
        let mut r = Repository::default();
        r.tags.insert(tag.into(), Digest::of(tag.as_bytes()));
        r
    }

    #[test]
    fn hosts_are_told_apart_by_ns_or_prefix_else_docker_io_or_first() {
        let mut cat = Catalog::default();
        for host in ["quay.io", "docker.io", "a.example"] {
            cat.repos.entry("lib/x".into()).or_default().insert(host.into(), repo_with_tag(host));
        }
        cat.repos.entry("only/y".into()).or_default().insert("b.example".into(), repo_with_tag("b.example"));
        let tag_of = |r: Vec<&Repository>| r.first().map(|r| r.tags.keys().next().cloned().unwrap_or_default());
        assert_eq!(tag_of(cat.repositories("lib/x", Some("quay.io"))), Some("quay.io".into()));
        assert_eq!(tag_of(cat.repositories("lib/x", Some("registry-1.docker.io"))), Some("docker.io".into()));
        assert_eq!(tag_of(cat.repositories("lib/x", None)), Some("docker.io".into()));
        assert_eq!(cat.repositories("lib/x", None).len(), 3);
        assert_eq!(tag_of(cat.repositories("quay.io/lib/x", None)), Some("quay.io".into()));
        assert_eq!(tag_of(cat.repositories("lib/x", Some("ghcr.io"))), None);
        assert_eq!(tag_of(cat.repositories("only/y", None)), Some("b.example".into()));
        assert_eq!(tag_of(cat.repositories("only/y", Some("docker.io"))), None);
        assert_eq!(tag_of(cat.repositories("nope/z", None)), None);
        cat.repos.get_mut("lib/x").map(|h| h.remove("docker.io"));
        assert_eq!(tag_of(cat.repositories("lib/x", None)), Some("a.example".into()));
        assert_eq!(cat.repository_names().collect::<Vec<_>>(), ["lib/x", "only/y"]);
    }
}
