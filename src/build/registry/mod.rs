//! Registries: turn a pinned reference into the exact set of blobs to carry.
//!
//! [`Registries`] wraps oci-client with what bundles.toml says per host
//! (insecure, mirrors, extra CA) and the docker config's credentials, and
//! retries transient failures. [`resolve_image`] walks index → platform
//! manifests → config and layers, storing every manifest in the blob cache
//! byte-for-byte as served (after checking its digest).
//!
//! Architecture invariant: nothing here writes a blob except through
//! [`BlobCache::writer`], which verifies digest and size first.

pub mod referrers;
pub mod signature;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{BlobResponse, Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError};
use oci_client::secrets::RegistryAuth;
use oci_client::RegistryOperation;
use std::io::Write;

use crate::build::cache::{BlobCache, CacheError};
use crate::build::manifest::{ImageEntry, Reference, RegistryConfig};
use crate::digest::Digest;
use crate::distribution::auth::{AuthError, DockerConfig};
use crate::distribution::{is_transient, ATTEMPTS};
use crate::oci::{self, Descriptor, Platform};

/// Media types we ask registries for, indexes first.
const ACCEPT: &[&str] = &[oci::OCI_INDEX, oci::DOCKER_LIST, oci::OCI_MANIFEST, oci::DOCKER_MANIFEST];

/// Errors resolving or fetching an image.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The registry said no, or could not be reached.
    #[error("{image}: registry {registry}: {message}")]
    Registry {
        /// Image label (`namespace/file (name)`).
        image: String,
        /// Host tried last.
        registry: String,
        /// What happened and what to do.
        message: String,
    },
    /// The content is of a kind preseed cannot carry.
    #[error("{image}: {message}")]
    Unsupported {
        /// Image label.
        image: String,
        /// What and why.
        message: String,
    },
    /// A requested platform is not in the image's index.
    #[error("{image}: platform {platform} not found; the index has: {available}. Adjust `platforms` for this image")]
    MissingPlatform {
        /// Image label.
        image: String,
        /// Wanted platform.
        platform: Platform,
        /// What the index offers.
        available: String,
    },
    /// `--offline` and a blob is not cached.
    #[error("{image}: --offline but blob {digest} is not in the cache {cache}: run once without --offline")]
    NotCached {
        /// Image label.
        image: String,
        /// Missing digest.
        digest: Digest,
        /// Cache dir.
        cache: String,
    },
    /// A reference without digest reached resolution (the manifest check should prevent it).
    #[error("{image}: not pinned by digest")]
    Unpinned {
        /// Image label.
        image: String,
    },
    /// Cache failure, including digest/size mismatches of fetched content.
    #[error("{image}: {source}")]
    Cache {
        /// Image label.
        image: String,
        /// The error.
        source: CacheError,
    },
    /// Credentials could not be read.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A CA file could not be read.
    #[error("registry {registry}: ca {path}: {message}")]
    Ca {
        /// Registry host.
        registry: String,
        /// File.
        path: String,
        /// What happened.
        message: String,
    },
}

/// An image resolved to its blobs.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    /// The pinned index or manifest.
    pub root: Descriptor,
    /// Every blob to carry, each once: root, platform manifests, configs, layers.
    pub blobs: Vec<Descriptor>,
    /// Platforms carried (empty for single-manifest images with no config platform known).
    pub platforms: Vec<Platform>,
}

/// Access to every registry in a manifest.
pub struct Registries {
    client: oci_client::Client,
    configs: BTreeMap<String, RegistryConfig>,
    docker: DockerConfig,
    authed: tokio::sync::Mutex<HashSet<(String, String)>>,
}

impl Registries {
    /// Builds the client: plain HTTP only for hosts marked `insecure`, extra CAs trusted.
    pub fn new(configs: &BTreeMap<String, RegistryConfig>, docker: DockerConfig) -> Result<Self, ResolveError> {
        let insecure: Vec<String> = configs.iter().filter(|(_, c)| c.insecure).map(|(h, _)| h.clone()).collect();
        let mut extra_root_certificates = Vec::new();
        for (host, cfg) in configs {
            if let Some(ca) = &cfg.ca {
                let data = std::fs::read(ca).map_err(|e| ResolveError::Ca {
                    registry: host.clone(),
                    path: ca.display().to_string(),
                    message: e.to_string(),
                })?;
                extra_root_certificates.push(Certificate { encoding: CertificateEncoding::Pem, data });
            }
        }
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure),
            extra_root_certificates,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        Ok(Registries {
            client: oci_client::Client::new(config),
            configs: configs.clone(),
            docker,
            authed: Default::default(),
        })
    }

    /// Hosts to try for a reference: its mirrors in order, then the registry.
    fn hosts(&self, reference: &Reference) -> Vec<String> {
        let mut hosts = self.configs.get(&reference.registry).map(|c| c.mirrors.clone()).unwrap_or_default();
        hosts.push(reference.registry.clone());
        hosts
    }

    fn auth_for(&self, host: &str) -> Result<RegistryAuth, ResolveError> {
        Ok(match self.docker.credentials(host)? {
            Some(c) => RegistryAuth::Basic(c.username, c.password),
            None => RegistryAuth::Anonymous,
        })
    }

    async fn ensure_auth(&self, host: &str, r: &oci_client::Reference) -> Result<(), OciDistributionError> {
        let key = (host.to_string(), r.repository().to_string());
        if self.authed.lock().await.contains(&key) {
            return Ok(());
        }
        let auth = self.auth_for(host).map_err(|e| OciDistributionError::AuthenticationFailure(e.to_string()))?;
        self.client.auth(r, &auth, RegistryOperation::Pull).await?;
        self.authed.lock().await.insert(key);
        Ok(())
    }

    /// Runs `op` against each host (mirrors first), retrying transient errors.
    async fn with_hosts<T, F, Fut>(&self, image: &str, reference: &Reference, mut op: F) -> Result<T, ResolveError>
    where
        F: FnMut(oci_client::Reference) -> Fut,
        Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
    {
        let hosts = self.hosts(reference);
        let mut last = None;
        for host in &hosts {
            let r = oci_ref(host, reference);
            for attempt in 0..ATTEMPTS {
                let result = match self.ensure_auth(host, &r).await {
                    Ok(()) => op(r.clone()).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(v) => return Ok(v),
                    Err(e) => {
                        let transient = is_transient(&e);
                        last = Some((host.clone(), e));
                        if !transient || attempt + 1 == ATTEMPTS {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                    }
                }
            }
        }
        let (host, e) = last.expect("at least one host tried");
        Err(ResolveError::Registry {
            image: image.to_string(),
            registry: host.clone(),
            message: explain(&host, &e, &self.configs),
        })
    }

    /// Resolves a tag to the digest the registry serves for it now.
    pub async fn resolve_tag(&self, image: &str, reference: &Reference) -> Result<Digest, ResolveError> {
        let tagged = Reference { digest: None, tag: Some(reference.tag_or_latest().to_string()), ..reference.clone() };
        let bytes = self
            .with_hosts(image, &tagged, |r| async move {
                let (bytes, _) = self.client.pull_manifest_raw(&r, &RegistryAuth::Anonymous, ACCEPT).await?;
                Ok(bytes)
            })
            .await?;
        Ok(Digest::of(&bytes))
    }

    /// Fetches a manifest or index by digest into the cache (unless there).
    async fn fetch_manifest(
        &self,
        image: &str,
        reference: &Reference,
        digest: &Digest,
        cache: &BlobCache,
        offline: bool,
    ) -> Result<Vec<u8>, ResolveError> {
        let cache_err = |source| ResolveError::Cache { image: image.to_string(), source };
        if cache.path(digest).is_file() {
            return cache.read_small(digest).map_err(cache_err);
        }
        if offline {
            return Err(ResolveError::NotCached {
                image: image.into(),
                digest: digest.clone(),
                cache: cache.root().display().to_string(),
            });
        }
        let pinned = reference.with_digest(digest.clone());
        let bytes = self
            .with_hosts(image, &pinned, |r| async move {
                let (bytes, _) = self.client.pull_manifest_raw(&r, &RegistryAuth::Anonymous, ACCEPT).await?;
                Ok(bytes)
            })
            .await?;
        let mut w = cache.writer(digest, None, &format!("manifest {digest} of {image}")).map_err(cache_err)?;
        w.write_all(&bytes).map_err(|e| cache_err(CacheError::Io { path: cache.path(digest), source: e }))?;
        w.commit().map_err(cache_err)?;
        Ok(bytes.to_vec())
    }

    /// Downloads one blob into the cache, streaming and verifying it.
    pub async fn fetch_blob(
        &self,
        image: &str,
        reference: &Reference,
        blob: &Descriptor,
        cache: &BlobCache,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), ResolveError> {
        let cache_err = |source| ResolveError::Cache { image: image.to_string(), source };
        let what = format!("blob {} of {image}", blob.digest);
        let result: Result<(), CacheError> = self
            .with_hosts(image, reference, |r| {
                let what = what.clone();
                async move {
                    // A ranged request from 0 returns the stream unverified by
                    // oci-client: BlobWriter verifies it, so each byte is hashed
                    // once (hashing is most of a cold bundle's CPU time).
                    let digest = blob.digest.to_string();
                    let mut stream = match self.client.pull_blob_stream_partial(&r, digest.as_str(), 0, None).await? {
                        BlobResponse::Full(s) | BlobResponse::Partial(s) => s,
                    };
                    let mut w = cache
                        .writer(&blob.digest, Some(blob.size), &what)
                        .map_err(|e| OciDistributionError::GenericError(Some(e.to_string())))?;
                    while let Some(chunk) = stream.stream.next().await {
                        let chunk = chunk.map_err(digest_or_io)?;
                        // Guard against a server that streams forever.
                        if w.written() + chunk.len() as u64 > blob.size {
                            return Err(OciDistributionError::GenericError(Some(format!(
                                "size mismatch for {what}: server sent more than the descriptor's {} bytes",
                                blob.size
                            ))));
                        }
                        w.write_all(&chunk)?;
                        progress(chunk.len() as u64);
                    }
                    // Verified here, inside the host loop, so that a mirror
                    // serving wrong bytes falls back to the next host.
                    match w.commit() {
                        Ok(_) => Ok(Ok(())),
                        Err(CacheError::DigestMismatch { expected, found, .. }) => {
                            Err(OciDistributionError::DigestError(DigestError::VerificationError {
                                expected: expected.to_string(),
                                actual: found.to_string(),
                            }))
                        }
                        Err(other) => Ok(Err(other)),
                    }
                }
            })
            .await?;
        result.map_err(cache_err)
    }
}

/// Resolves one image: fetches the pinned root and the selected platforms'
/// manifests into the cache and lists every blob the tarball must carry.
pub async fn resolve_image(
    registries: &Registries,
    entry: &ImageEntry,
    cache: &BlobCache,
    offline: bool,
) -> Result<ResolvedImage, ResolveError> {
    let image = entry.label();
    let reference = &entry.reference;
    let root_digest = reference.digest.clone().ok_or_else(|| ResolveError::Unpinned { image: image.clone() })?;
    let root_bytes = registries.fetch_manifest(&image, reference, &root_digest, cache, offline).await?;
    let root_type = media_type_of(&image, &root_bytes)?;
    let root = Descriptor::new(&root_type, root_digest.clone(), root_bytes.len() as u64);
    let mut blobs = vec![root.clone()];
    let mut manifests = Vec::new();
    let mut platforms = Vec::new();
    if oci::is_index(&root_type) {
        let index: oci::Index = serde_json::from_slice(&root_bytes)
            .map_err(|e| ResolveError::Unsupported { image: image.clone(), message: format!("bad index: {e}") })?;
        for want in &entry.platforms {
            let found = index.manifests.iter().find(|m| m.platform.as_ref().is_some_and(|p| want.matches(p)));
            match found {
                Some(m) => {
                    if !manifests.iter().any(|x: &Descriptor| x.digest == m.digest) {
                        manifests.push(m.clone());
                        platforms.push(m.platform.clone().expect("matched on platform"));
                    }
                }
                None => {
                    let available: Vec<String> =
                        index.manifests.iter().filter_map(|m| m.platform.as_ref().map(|p| p.to_string())).collect();
                    return Err(ResolveError::MissingPlatform {
                        image,
                        platform: want.clone(),
                        available: available.join(", "),
                    });
                }
            }
        }
    } else {
        manifests.push(root.clone());
    }
    let mut children = Vec::new();
    for m in &manifests {
        let bytes = if m.digest == root_digest {
            root_bytes.clone()
        } else {
            registries.fetch_manifest(&image, reference, &m.digest, cache, offline).await?
        };
        if bytes.len() as u64 != m.size {
            return Err(ResolveError::Cache {
                image: image.clone(),
                source: CacheError::SizeMismatch {
                    what: format!("manifest {}", m.digest),
                    expected: m.size,
                    found: bytes.len() as u64,
                },
            });
        }
        let media_type = media_type_of(&image, &bytes)?;
        if !oci::is_manifest(&media_type) {
            return Err(ResolveError::Unsupported {
                image,
                message: format!("manifest {} has media type {media_type}; nested indexes are not supported", m.digest),
            });
        }
        let manifest: oci::Manifest = serde_json::from_slice(&bytes).map_err(|e| ResolveError::Unsupported {
            image: image.clone(),
            message: format!("bad manifest {}: {e}", m.digest),
        })?;
        if m.digest != root_digest {
            blobs.push(Descriptor::new(&media_type, m.digest.clone(), m.size));
        }
        children.push(manifest.config.clone());
        for layer in &manifest.layers {
            if !layer.urls.is_empty() || oci::is_foreign_layer(&layer.media_type) {
                return Err(ResolveError::Unsupported {
                    image,
                    message: format!("layer {} is a foreign layer ({}): its bytes are not in the registry, so an offline node cannot have them", layer.digest, layer.media_type),
                });
            }
            if !oci::is_known_layer(&layer.media_type) {
                return Err(ResolveError::Unsupported {
                    image,
                    message: format!("layer {} has unknown media type {:?}", layer.digest, layer.media_type),
                });
            }
            children.push(layer.clone());
        }
    }
    for c in children {
        if !blobs.iter().any(|b| b.digest == c.digest) {
            blobs.push(Descriptor::new(&c.media_type, c.digest, c.size));
        }
    }
    Ok(ResolvedImage { root, blobs, platforms })
}

/// Media type of a manifest document: its `mediaType` field, else inferred.
/// Schema1 is refused with a clear message.
fn media_type_of(image: &str, bytes: &[u8]) -> Result<String, ResolveError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        #[serde(default)]
        schema_version: Option<u32>,
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        config: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(bytes).map_err(|e| ResolveError::Unsupported {
        image: image.into(),
        message: format!("manifest is not JSON: {e}"),
    })?;
    if probe.schema_version == Some(1)
        || matches!(probe.media_type.as_deref(), Some(oci::DOCKER_SCHEMA1 | oci::DOCKER_SCHEMA1_UNSIGNED))
    {
        return Err(ResolveError::Unsupported {
            image: image.into(),
            message: "Docker schema1 manifest: deprecated and unsupported; re-push the image with a current client (schema2 or OCI)".into(),
        });
    }
    let media_type = match probe.media_type {
        Some(t) => t,
        None if probe.manifests.is_some() => oci::OCI_INDEX.to_string(),
        None if probe.config.is_some() => oci::OCI_MANIFEST.to_string(),
        None => String::new(),
    };
    if !oci::is_index(&media_type) && !oci::is_manifest(&media_type) {
        return Err(ResolveError::Unsupported {
            image: image.into(),
            message: format!("unknown manifest media type {media_type:?}"),
        });
    }
    Ok(media_type)
}

fn oci_ref(host: &str, r: &Reference) -> oci_client::Reference {
    match &r.digest {
        Some(d) => oci_client::Reference::with_digest(host.to_string(), r.repository.clone(), d.to_string()),
        None => oci_client::Reference::with_tag(host.to_string(), r.repository.clone(), r.tag_or_latest().to_string()),
    }
}

/// oci-client reports a blob whose bytes do not hash to its digest as an I/O
/// error at the end of the stream: surface it as the digest error it is, so
/// it is not retried like a dropped connection (the next host is tried).
fn digest_or_io(e: std::io::Error) -> OciDistributionError {
    match e.downcast::<DigestError>() {
        Ok(d) => OciDistributionError::DigestError(d),
        Err(e) => OciDistributionError::IoError(e),
    }
}

/// A message for a registry failure that says what to do.
fn explain(host: &str, e: &OciDistributionError, configs: &BTreeMap<String, RegistryConfig>) -> String {
    let text = crate::distribution::chain(e);
    let hint = match e {
        OciDistributionError::DigestError(DigestError::VerificationError { expected, actual }) => {
            return format!("digest mismatch: expected {expected}, found {actual}: the registry served other bytes than the digest names; nothing was cached");
        }
        OciDistributionError::AuthenticationFailure(_) | OciDistributionError::UnauthorizedError { .. } => {
            format!("authentication failed: run `docker login {host}` or add credentials for {host:?} to $DOCKER_CONFIG/config.json (~/.docker/config.json)")
        }
        OciDistributionError::ServerError { code: 401 | 403, .. } => {
            format!("access denied: check the credentials for {host:?} in $DOCKER_CONFIG/config.json (~/.docker/config.json)")
        }
        OciDistributionError::ImageManifestNotFoundError(_) | OciDistributionError::ServerError { code: 404, .. } => {
            "not found: check the repository name and digest".to_string()
        }
        OciDistributionError::RequestError(re) if re.is_connect() && text.contains("certificate") => {
            format!("its TLS certificate is not trusted: add the CA that signed it as `ca = \"path/to/ca.pem\"` under `[registries.{host:?}]`")
        }
        OciDistributionError::RequestError(re)
            if re.is_connect()
                && ["dns error", "failed to lookup address", "Name or service not known"]
                    .iter()
                    .any(|m| text.contains(m)) =>
        {
            format!("cannot resolve the host name of {host:?}: check its spelling in bundles.toml and this machine's DNS; offline, bundle with --offline from a filled cache")
        }
        OciDistributionError::RequestError(re) if re.is_connect() && text.contains("Connection refused") => {
            format!("nothing answers on {host:?} (connection refused): is the registry running, and is the port right?")
        }
        OciDistributionError::RequestError(re)
            if re.is_connect()
                && ["InvalidContentType", "corrupt message", "wrong version number", "HTTP response to HTTPS"]
                    .iter()
                    .any(|m| text.contains(m)) =>
        {
            format!(
                "{host:?} does not speak HTTPS: for a plain-HTTP registry set `[registries.{host:?}] insecure = true`"
            )
        }
        OciDistributionError::RequestError(re) if re.is_connect() || re.is_timeout() => {
            let insecure = configs.get(host).is_some_and(|c| c.insecure);
            if insecure {
                "cannot connect: is the registry running and reachable?".to_string()
            } else {
                format!("cannot connect over HTTPS: is the registry reachable? For a plain-HTTP registry set `[registries.{host:?}] insecure = true`")
            }
        }
        _ => String::new(),
    };
    if hint.is_empty() {
        text
    } else {
        format!("{hint} ({text})")
    }
}
