//! `bundles.toml`: what the release engineer pinned. Parsed and validated in
//! full before any network traffic; every error names the file and line.
//!
//! Architecture invariant: this module never touches the network or the
//! cache. `pin` (rewriting tags to digests in place) is its own stage, [`crate::build::pin`].

pub mod reference;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::oci::Platform;
use crate::partition::index::ReferrerKind;
use crate::partition::Format;
use crate::trust::PublicKey;
pub use reference::Reference;

/// Default containerd namespace: the one kubelet's CRI uses.
pub const DEFAULT_NAMESPACE: &str = "k8s.io";

/// A validated `bundles.toml`.
#[derive(Clone, Debug)]
pub struct BundleManifest {
    /// Where it was read from.
    pub path: PathBuf,
    /// Partition format.
    pub format: Format,
    /// Default platforms for every image.
    pub platforms: Vec<Platform>,
    /// Append a dm-verity hash tree to the partition.
    pub verity: bool,
    /// Per-registry settings, keyed by host as written in refs.
    pub registries: BTreeMap<String, RegistryConfig>,
    /// The images, in file order.
    pub images: Vec<ImageEntry>,
}

/// `[registries."host"]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Plain HTTP allowed for this host (never implied).
    #[serde(default)]
    pub insecure: bool,
    /// Hosts tried in order before the registry itself.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// Extra PEM trust root, relative to the manifest's directory.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

/// Where an image comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ImageSource {
    /// Pulled from its registry.
    Remote,
    /// Built from the workspace package `images/<name>`.
    Build(String),
}

/// One `[[image]]`.
#[derive(Clone, Debug)]
pub struct ImageEntry {
    /// 1-based line of the entry's `ref` in the manifest.
    pub line: usize,
    /// The reference (normalized).
    pub reference: Reference,
    /// Remote or in-tree.
    pub source: ImageSource,
    /// containerd namespace, also the directory in the partition.
    pub namespace: String,
    /// Tarball name without `.tar`.
    pub file: String,
    /// Platforms to keep.
    pub platforms: Vec<Platform>,
    /// Extra names (normalized) the loader gives the image.
    pub names: Vec<String>,
    /// Pin against kubelet GC.
    pub pin: bool,
    /// The namespace's pod sandbox image.
    pub sandbox: bool,
    /// Needed before kubelet starts: `preseed load` imports it before it
    /// tells systemd it is ready (sandbox images always are).
    pub boot: bool,
    /// Keys one of which must have signed the pinned digest (empty: not
    /// checked — `verify = false`, no `[verify]` policy, or an in-tree image).
    pub verify: Vec<Arc<PublicKey>>,
    /// What of its referrers to carry (none for in-tree images).
    pub referrers: Vec<ReferrerKind>,
}

/// What `referrers` carries unless bundles.toml says otherwise: the
/// signatures and attestations that exist (an image without any is fine).
pub const DEFAULT_REFERRERS: &[ReferrerKind] = &[ReferrerKind::Signature, ReferrerKind::Attestation];

impl ImageEntry {
    /// `namespace/file.tar`, the tarball's path in the partition.
    pub fn tarball_path(&self) -> String {
        format!("{}/{}.tar", self.namespace, self.file)
    }

    /// A short label for messages: `k8s.io/pause (registry.k8s.io/pause:3.10)`.
    pub fn label(&self) -> String {
        format!("{}/{} ({})", self.namespace, self.file, self.reference.name())
    }
}

/// One problem in a manifest, located.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// 1-based line (0 if unknown).
    pub line: usize,
    /// What is wrong and what to do.
    pub message: String,
}

/// A manifest that could not be read or is invalid. Lists every problem found.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Could not read the file.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Syntax or schema problems.
    #[error("{}", format_problems(path, problems))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem, by line.
        problems: Vec<Problem>,
    },
}

fn format_problems(path: &Path, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|p| {
            if p.line > 0 {
                format!("{}:{}: {}", path.display(), p.line, p.message)
            } else {
                format!("{}: {}", path.display(), p.message)
            }
        })
        .collect();
    lines.join("\n")
}

/// Options that change validation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Strictness {
    /// Allow remote images without a digest.
    pub allow_unpinned: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(default)]
    partition: RawPartition,
    #[serde(default)]
    registries: BTreeMap<String, Spanned<RegistryConfig>>,
    #[serde(default)]
    image: Vec<RawImage>,
    verify: Option<RawVerify>,
}

/// `[verify]`: the keys every remote image must be signed by (one of).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVerify {
    #[serde(default)]
    keys: Vec<Spanned<String>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPartition {
    format: Option<Spanned<String>>,
    platforms: Option<Vec<Spanned<String>>>,
    verity: Option<bool>,
    referrers: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    #[serde(rename = "ref")]
    reference: Spanned<String>,
    build: Option<Spanned<String>>,
    namespace: Option<Spanned<String>>,
    file: Option<Spanned<String>>,
    platforms: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    names: Vec<Spanned<String>>,
    referrers: Option<Vec<Spanned<String>>>,
    pin: Option<bool>,
    sandbox: Option<bool>,
    boot: Option<bool>,
    /// `false`, `true` or a list of key files (checked by hand: an untagged
    /// enum would lose the spans).
    verify: Option<Spanned<toml::Value>>,
}

/// Maps byte offsets to 1-based line numbers.
struct Lines(Vec<usize>);

impl Lines {
    fn new(text: &str) -> Self {
        Lines(std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect())
    }
    fn line<T>(&self, s: &Spanned<T>) -> usize {
        self.at(s.span().start)
    }
    fn at(&self, offset: usize) -> usize {
        self.0.partition_point(|&start| start <= offset)
    }
}

/// containerd's namespace rule: alphanumerics separated by single `.`, `_` or `-`.
fn valid_namespace(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= 76
        && ns.split(['.', '_', '-']).all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// A tarball name: one path component, no leading dot.
fn valid_file(f: &str) -> bool {
    !f.is_empty()
        && f.len() <= 200
        && !f.starts_with('.')
        && f.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl BundleManifest {
    /// Reads and validates a manifest file.
    pub fn load(path: &Path, strict: Strictness) -> Result<Self, ManifestError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ManifestError::Read { path: path.to_path_buf(), source })?;
        Self::parse(path, &text, strict)
    }

    /// Parses and validates manifest text (`path` is used in messages and to
    /// resolve relative `ca` paths).
    pub fn parse(path: &Path, text: &str, strict: Strictness) -> Result<Self, ManifestError> {
        let lines = Lines::new(text);
        let invalid = |problems| ManifestError::Invalid { path: path.to_path_buf(), problems };
        let raw: RawManifest = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| lines.at(s.start)).unwrap_or(0);
            let message = e.message().trim().to_string();
            invalid(vec![Problem { line, message: format!("{message} (see docs/bundles-toml.md)") }])
        })?;

        let mut problems = Vec::new();
        let mut problem = |line: usize, message: String| problems.push(Problem { line, message });

        let format = match &raw.partition.format {
            None => Format::default(),
            Some(f) => f.get_ref().parse().unwrap_or_else(|e: crate::partition::UnknownFormat| {
                problem(lines.line(f), e.to_string());
                Format::default()
            }),
        };
        let parse_platforms = |list: &[Spanned<String>], problem: &mut dyn FnMut(usize, String)| {
            list.iter()
                .filter_map(|p| match p.get_ref().parse::<Platform>() {
                    Ok(parsed) => match parsed.check_known() {
                        Ok(()) => Some(parsed),
                        Err(e) => {
                            problem(lines.line(p), e.to_string());
                            None
                        }
                    },
                    Err(e) => {
                        problem(lines.line(p), e.to_string());
                        None
                    }
                })
                .collect::<Vec<_>>()
        };
        let platforms = match &raw.partition.platforms {
            Some(list) if list.is_empty() => {
                problem(0, "[partition] platforms is empty: list at least one, e.g. [\"linux/amd64\"]".into());
                vec![]
            }
            Some(list) => parse_platforms(list, &mut problem),
            None => vec![Platform::host()],
        };

        let parse_referrers = |list: &[Spanned<String>], problem: &mut dyn FnMut(usize, String)| {
            let mut kinds = Vec::new();
            for k in list {
                let kind = [ReferrerKind::Signature, ReferrerKind::Attestation, ReferrerKind::Sbom]
                    .into_iter()
                    .find(|kind| kind.plural() == k.get_ref());
                match kind {
                    Some(kind) if !kinds.contains(&kind) => kinds.push(kind),
                    Some(_) => {}
                    None => problem(
                        lines.line(k),
                        format!(
                            "referrers: unknown kind {:?}: expected \"signatures\", \"attestations\" or \"sboms\"",
                            k.get_ref()
                        ),
                    ),
                }
            }
            kinds
        };
        let default_referrers = match &raw.partition.referrers {
            Some(list) => parse_referrers(list, &mut problem),
            None => DEFAULT_REFERRERS.to_vec(),
        };

        let base = path.parent().unwrap_or(Path::new("."));
        let mut registries = BTreeMap::new();
        for (host, cfg) in raw.registries {
            let line = lines.line(&cfg);
            let mut cfg = cfg.into_inner();
            if let Some(ca) = &cfg.ca {
                let ca = base.join(ca);
                if !ca.is_file() {
                    problem(line, format!("registry {host:?}: ca file {} not found", ca.display()));
                }
                cfg.ca = Some(ca);
            }
            registries.insert(host, cfg);
        }

        // Each key file is read once, however many images name it.
        let mut keys: HashMap<String, Option<Arc<PublicKey>>> = HashMap::new();
        let mut load_key = |name: &str, line: usize, problem: &mut dyn FnMut(usize, String)| {
            let key = keys.entry(name.to_string()).or_insert_with(|| match PublicKey::load(name, &base.join(name)) {
                Ok(k) => Some(Arc::new(k)),
                Err(e) => {
                    problem(line, e.to_string());
                    None
                }
            });
            key.clone()
        };
        let mut default_keys = Vec::new();
        for k in raw.verify.iter().flat_map(|v| &v.keys) {
            if let Some(key) = load_key(k.get_ref(), lines.line(k), &mut problem) {
                default_keys.push(key);
            }
        }

        let no_images = raw.image.is_empty();
        let mut images = Vec::new();
        let mut seen_files: HashMap<String, usize> = HashMap::new();
        let mut sandboxes: HashMap<String, usize> = HashMap::new();
        for raw_image in raw.image {
            let line = lines.line(&raw_image.reference);
            let text = raw_image.reference.get_ref();
            let reference = match text.parse::<Reference>() {
                Ok(r) => r,
                Err(e) => {
                    problem(line, format!("image ref {text:?}: {e}"));
                    continue;
                }
            };
            let source = match &raw_image.build {
                Some(pkg) if pkg.get_ref().is_empty() => {
                    problem(lines.line(pkg), "build = \"\": name a workspace package under images/".into());
                    ImageSource::Remote
                }
                Some(pkg) => ImageSource::Build(pkg.get_ref().clone()),
                None => ImageSource::Remote,
            };
            if source == ImageSource::Remote && reference.digest.is_none() && !strict.allow_unpinned {
                problem(
                    line,
                    format!(
                        "image {:?} is not pinned by digest: run `preseed pin` to add it, or pass --allow-unpinned",
                        text
                    ),
                );
            }
            let namespace = match &raw_image.namespace {
                Some(ns) if !valid_namespace(ns.get_ref()) => {
                    problem(
                        lines.line(ns),
                        format!(
                            "namespace {:?} is not a valid containerd namespace (letters, digits, single . _ -)",
                            ns.get_ref()
                        ),
                    );
                    continue;
                }
                Some(ns) => ns.get_ref().clone(),
                None => DEFAULT_NAMESPACE.to_string(),
            };
            let file = match &raw_image.file {
                Some(f) if !valid_file(f.get_ref()) => {
                    problem(
                        lines.line(f),
                        format!(
                            "file {:?}: one name of letters, digits, . _ - (no '/', no leading '.'), without .tar",
                            f.get_ref()
                        ),
                    );
                    continue;
                }
                Some(f) => f.get_ref().clone(),
                None => reference.repository.rsplit('/').next().unwrap_or_default().to_string(),
            };
            let platforms = match &raw_image.platforms {
                Some(list) if list.is_empty() => {
                    problem(line, format!("image {text:?}: platforms is empty"));
                    continue;
                }
                Some(list) => parse_platforms(list, &mut problem),
                None => platforms.clone(),
            };
            // An in-tree image is compiled for this machine's platform only.
            if let ImageSource::Build(pkg) = &source {
                let host = Platform::host();
                match &raw_image.platforms {
                    Some(list) => {
                        for (written, p) in list.iter().zip(&platforms) {
                            if !host.matches(p) && !p.matches(&host) {
                                problem(
                                    lines.line(written),
                                    format!(
                                        "image {text:?}: build = {pkg:?} is compiled for this machine's platform \
                                         ({host}) only, not {p}: remove {p} from its platforms, or bundle on a {p} \
                                         machine"
                                    ),
                                );
                            }
                        }
                    }
                    None if !platforms.iter().any(|p| host.matches(p) || p.matches(&host)) => problem(
                        line,
                        format!(
                            "image {text:?}: build = {pkg:?} is compiled for this machine's platform ({host}) only, \
                             which [partition] platforms leaves out: give this image platforms = [\"{host}\"], or \
                             bundle on a machine of one of those platforms"
                        ),
                    ),
                    None => {}
                }
            }
            let mut names = Vec::new();
            for n in &raw_image.names {
                match n.get_ref().parse::<Reference>() {
                    Ok(r) => names.push(r.name()),
                    Err(e) => problem(lines.line(n), format!("extra name {:?}: {e}", n.get_ref())),
                }
            }
            let key = format!("{namespace}/{file}");
            if let Some(first) = seen_files.insert(key.clone(), line) {
                problem(
                    line,
                    format!("{key}.tar is also written by the image on line {first}: set `file` to tell them apart"),
                );
            }
            let sandbox = raw_image.sandbox.unwrap_or(false);
            if sandbox {
                if let Some(first) = sandboxes.insert(namespace.clone(), line) {
                    problem(line, format!("namespace {namespace:?} already has a sandbox image (line {first}): at most one per namespace"));
                }
            }
            let verify = match &raw_image.verify {
                None if source == ImageSource::Remote => default_keys.clone(),
                None => vec![],
                Some(v) => {
                    let vline = lines.line(v);
                    match v.get_ref() {
                        toml::Value::Boolean(false) => vec![],
                        _ if source != ImageSource::Remote => {
                            problem(vline, format!("image {text:?} is built from this workspace, not pulled: it has no signature to check; remove `verify` (in-tree images are exempt)"));
                            vec![]
                        }
                        toml::Value::Boolean(true) if default_keys.is_empty() => {
                            problem(
                                vline,
                                "verify = true but [verify] keys lists no key: list the keys here or there".into(),
                            );
                            vec![]
                        }
                        toml::Value::Boolean(true) => default_keys.clone(),
                        toml::Value::Array(list) if !list.is_empty() && list.iter().all(|k| k.is_str()) => list
                            .iter()
                            .filter_map(|k| load_key(k.as_str().unwrap_or_default(), vline, &mut problem))
                            .collect(),
                        _ => {
                            problem(vline, "verify: expected false (exempt this image), true or a list of public key files, e.g. [\"keys/release.pub\"]".into());
                            vec![]
                        }
                    }
                }
            };
            let referrers = match (&raw_image.referrers, &source) {
                (Some(list), ImageSource::Build(_)) if !list.is_empty() => {
                    problem(line, format!("image {text:?} is built from this workspace: it has no referrers to carry; remove `referrers`"));
                    Vec::new()
                }
                (_, ImageSource::Build(_)) => Vec::new(),
                (Some(list), _) => parse_referrers(list, &mut problem),
                (None, _) => default_referrers.clone(),
            };
            images.push(ImageEntry {
                line,
                reference,
                source,
                namespace,
                file,
                platforms,
                names,
                pin: raw_image.pin.unwrap_or(true),
                sandbox,
                boot: sandbox || raw_image.boot.unwrap_or(false),
                verify,
                referrers,
            });
        }
        if no_images {
            problem(
                lines.at(text.len()),
                "no [[image]] entries: nothing to bundle; add at least one (see docs/bundles-toml.md)".into(),
            );
        }
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        let verity = raw.partition.verity.unwrap_or(false);
        Ok(BundleManifest { path: path.to_path_buf(), format, platforms, verity, registries, images })
    }
}

impl fmt::Display for ImageEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<BundleManifest, ManifestError> {
        BundleManifest::parse(Path::new("bundles.toml"), text, Strictness::default())
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn defaults() {
        let m = parse(&format!("[[image]]\nref = \"registry.k8s.io/pause:3.10@{D}\"\nsandbox = true\n")).unwrap();
        let i = &m.images[0];
        assert_eq!(
            (i.namespace.as_str(), i.file.as_str(), i.pin, i.sandbox, i.line),
            ("k8s.io", "pause", true, true, 2)
        );
        assert_eq!(m.format, Format::Erofs);
    }

    #[test]
    fn errors_name_the_line() {
        assert!(
            err("[partition]\nformat = \"erofs\"\ncolour = 1\n").starts_with("bundles.toml:3: unknown field `colour`")
        );
        assert!(err("\n[[image]]\nref = \"Bad/Ref\"\n").starts_with("bundles.toml:3: image ref \"Bad/Ref\""));
        assert!(err("[[image]]\nref = \"nginx:1\"\n").contains("bundles.toml:2: image \"nginx:1\" is not pinned"));
        let dup = format!("[[image]]\nref = \"a@{D}\"\n[[image]]\nref = \"b/a@{D}\"\n");
        assert!(err(&dup).contains("bundles.toml:4: k8s.io/a.tar is also written by the image on line 2"));
        let two = format!("[[image]]\nref = \"a@{D}\"\nsandbox = true\n[[image]]\nref = \"b@{D}\"\nsandbox = true\n");
        assert!(err(&two).contains("bundles.toml:5: namespace \"k8s.io\" already has a sandbox image (line 2)"));
        assert!(err("[partition]\nplatforms = [\"linux\"]\n").contains("bundles.toml:2: invalid platform"));
        assert!(err("[partition]\nformat = \"ext4\"\n").contains("bundles.toml:2: unknown partition format"));
    }

    #[test]
    fn build_entries_need_no_digest() {
        let m = parse("[[image]]\nbuild = \"hello\"\nref = \"preseed.local/hello:0.1\"\n").unwrap();
        assert_eq!(m.images[0].source, ImageSource::Build("hello".into()));
    }
}
