//! Image references, normalized as docker does: `nginx` →
//! `docker.io/library/nginx:latest`, `ghcr.io/x/y:1@sha256:…` kept with both
//! the tag (which names it) and the digest (which pins it).

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;

/// The registry implied by a reference without a domain.
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// A parsed, normalized image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host as written (`docker.io` for none), with port if any.
    pub registry: String,
    /// Repository path, e.g. `library/nginx`.
    pub repository: String,
    /// Tag, if any (`latest` is implied only when neither tag nor digest is given).
    pub tag: Option<String>,
    /// Pinning digest, if any.
    pub digest: Option<Digest>,
}

/// Why a reference string was rejected.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReferenceError {
    /// Empty string.
    #[error("empty image reference")]
    Empty,
    /// Uppercase or other invalid characters in the repository.
    #[error("invalid repository {0:?}: path components are lowercase letters, digits and separators . _ - (e.g. docker.io/library/nginx)")]
    Repository(String),
    /// Bad tag.
    #[error("invalid tag {0:?}: up to 128 of letters, digits, _ . - not starting with . or -")]
    Tag(String),
    /// Bad digest.
    #[error("{0}")]
    Digest(String),
}

impl Reference {
    /// `registry/repository` without tag or digest.
    pub fn repo_name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The full name containerd records: `registry/repo:tag`, or
    /// `registry/repo@digest` for a digest-only reference.
    pub fn name(&self) -> String {
        match (&self.tag, &self.digest) {
            (Some(tag), _) => format!("{}:{tag}", self.repo_name()),
            (None, Some(d)) => format!("{}@{d}", self.repo_name()),
            (None, None) => format!("{}:latest", self.repo_name()),
        }
    }

    /// The same reference pinned to `digest`.
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference { digest: Some(digest), ..self.clone() }
    }

    /// The tag to resolve when no digest is given (`latest` by default).
    pub fn tag_or_latest(&self) -> &str {
        self.tag.as_deref().unwrap_or("latest")
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.repo_name())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

fn valid_component(c: &str) -> bool {
    // [a-z0-9]+ separated by '.', '_', '__' or '-'+.
    !c.is_empty()
        && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
        && c.as_bytes()[0].is_ascii_alphanumeric()
        && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
}

fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && !matches!(t.as_bytes()[0], b'.' | b'-')
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d.parse::<Digest>().map_err(|e| ReferenceError::Digest(e.to_string()))?)),
            None => (s, None),
        };
        // A ':' after the last '/' starts the tag; one before it is a port.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].find(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(ReferenceError::Tag(t.to_string()));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                (first.to_string(), path.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" { DEFAULT_REGISTRY.to_string() } else { registry };
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if !repository.split('/').all(valid_component) || registry.is_empty() {
            return Err(ReferenceError::Repository(name.to_string()));
        }
        Ok(Reference { registry, repository, tag: tag.map(str::to_string), digest })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_like_docker() {
        let r: Reference = "nginx".parse().unwrap();
        assert_eq!(r.name(), "docker.io/library/nginx:latest");
        let r: Reference = "user/app:1.2".parse().unwrap();
        assert_eq!(r.name(), "docker.io/user/app:1.2");
        let r: Reference = "127.0.0.1:5000/a/b:v1".parse().unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "a/b", Some("v1"))
        );
        let d = Digest::of(b"x");
        let r: Reference = format!("registry.k8s.io/pause:3.10@{d}").parse().unwrap();
        assert_eq!(r.name(), "registry.k8s.io/pause:3.10");
        assert_eq!(r.digest, Some(d.clone()));
        let r: Reference = format!("localhost/pause@{d}").parse().unwrap();
        assert_eq!(r.name(), format!("localhost/pause@{d}"));
        assert!(matches!("Nginx".parse::<Reference>(), Err(ReferenceError::Repository(_))));
        assert!(matches!("nginx:".parse::<Reference>(), Err(ReferenceError::Tag(_))));
        assert!(matches!("nginx@sha256:12".parse::<Reference>(), Err(ReferenceError::Digest(_))));
    }
}
