//! `preseed pin`: resolves tags to digests and writes them into
//! `bundles.toml` in place, keeping comments and layout (toml_edit).

use std::path::Path;

use crate::build::manifest::{BundleManifest, ImageSource, ManifestError, Strictness};
use crate::build::registry::{Registries, ResolveError};
use crate::distribution::auth::DockerConfig;

/// One reference `pin` rewrote.
#[derive(Clone, Debug, PartialEq)]
pub struct PinChange {
    /// Line of the entry.
    pub line: usize,
    /// The reference before.
    pub before: String,
    /// The reference after.
    pub after: String,
}

/// Errors of `pin`.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The manifest is invalid (other than being unpinned).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A tag could not be resolved.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// Reading or writing the file.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What happened.
        message: String,
    },
}

/// Adds missing digests (all digests with `update`) and rewrites the file.
pub async fn pin(path: &Path, update: bool) -> Result<Vec<PinChange>, PinError> {
    let manifest = BundleManifest::load(path, Strictness { allow_unpinned: true })?;
    let file_err = |message: String| PinError::File { path: path.display().to_string(), message };
    let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| file_err(e.to_string()))?;
    let registries = Registries::new(&manifest.registries, DockerConfig::from_env().map_err(ResolveError::from)?)?;

    let mut changes = Vec::new();
    if let Some(tables) = doc.get_mut("image").and_then(|i| i.as_array_of_tables_mut()) {
        // Validation succeeded, so tables and entries correspond one to one.
        for (table, entry) in tables.iter_mut().zip(&manifest.images) {
            if entry.source != ImageSource::Remote || (entry.reference.digest.is_some() && !update) {
                continue;
            }
            let digest = registries.resolve_tag(&entry.label(), &entry.reference).await?;
            let Some(value) = table.get_mut("ref").and_then(|v| v.as_value_mut()) else { continue };
            let before = value.as_str().unwrap_or_default().to_string();
            let base = before.split('@').next().unwrap_or_default();
            let after = format!("{base}@{digest}");
            if after != before {
                let decor = value.decor().clone();
                *value = toml_edit::Value::from(after.clone());
                *value.decor_mut() = decor;
                changes.push(PinChange { line: entry.line, before, after });
            }
        }
    }
    if !changes.is_empty() {
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, doc.to_string()).map_err(|e| file_err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| file_err(e.to_string()))?;
    }
    Ok(changes)
}
