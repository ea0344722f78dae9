//! What `preseed place` needs from containerd's configuration: the root
//! directory, and whether its content store is the local one with the
//! `shared` policy (the only case where a placed blob is found).
//!
//! containerd reads one TOML file (`--config`, default
//! `/etc/containerd/config.toml`) plus the files its `imports` name, later
//! ones overriding earlier ones. A missing main file means defaults.

use std::path::{Path, PathBuf};

/// containerd's default root directory.
pub const DEFAULT_ROOT: &str = "/var/lib/containerd";
/// containerd's default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/containerd/config.toml";

/// The metadata plugin's id: long form (config version 2 and 3), short
/// form (version 1).
const BOLT_PLUGINS: [&str; 2] = ["io.containerd.metadata.v1.bolt", "bolt"];

/// What the configuration says about where content lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentConfig {
    /// containerd's `root`.
    pub root: PathBuf,
    /// Why a placed blob would not be used, if it would not.
    pub unusable: Option<String>,
}

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file is not valid TOML.
    #[error("{path}: not valid TOML: {source}")]
    Toml {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: toml::de::Error,
    },
}

/// Reads `config` (and its imports).
pub fn read(config: &Path) -> Result<ContentConfig, ConfigError> {
    let out = ContentConfig { root: PathBuf::from(DEFAULT_ROOT), unusable: None };
    let main = match std::fs::read_to_string(config) {
        Ok(text) => parse(config, &text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(source) => return Err(ConfigError::Io { path: config.to_path_buf(), source }),
    };
    let mut tables = vec![main.clone()];
    for file in imports(config, &main)? {
        let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Io { path: file.clone(), source })?;
        tables.push(parse(&file, &text)?);
    }
    content(config, &tables, out)
}

/// What one configuration file says on its own (its `imports` not
/// followed): what [`read`] does to each file, for tests and fuzzing.
pub fn parse_content(config: &Path, text: &str) -> Result<ContentConfig, ConfigError> {
    let out = ContentConfig { root: PathBuf::from(DEFAULT_ROOT), unusable: None };
    content(config, &[parse(config, text)?], out)
}

/// `root` and the content store's usability from the parsed files, later
/// ones overriding earlier ones.
fn content(config: &Path, tables: &[toml::Table], mut out: ContentConfig) -> Result<ContentConfig, ConfigError> {
    for t in tables {
        if let Some(root) = t.get("root").and_then(toml::Value::as_str) {
            out.root = PathBuf::from(root);
        }
        let plugins = t.get("plugins").and_then(toml::Value::as_table);
        for id in BOLT_PLUGINS {
            let policy = plugins
                .and_then(|p| p.get(id))
                .and_then(|b| b.get("content_sharing_policy"))
                .and_then(toml::Value::as_str);
            if policy == Some("isolated") {
                out.unusable = Some(format!(
                    "containerd's content_sharing_policy is \"isolated\" ({}): it does not take blobs found in \
                     its store without their bytes",
                    config.display()
                ));
            }
        }
        let proxies = t.get("proxy_plugins").and_then(toml::Value::as_table);
        for (name, p) in proxies.into_iter().flatten() {
            if p.get("type").and_then(toml::Value::as_str) == Some("content") {
                out.unusable =
                    Some(format!("containerd's content store is the proxy plugin {name:?}, not a local directory"));
            }
        }
    }
    Ok(out)
}

fn parse(path: &Path, text: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|source| ConfigError::Toml { path: path.to_path_buf(), source })
}

/// The files `imports` names, in order: plain paths and `*` patterns in the
/// file name (the forms containerd's own configs use), relative to the
/// main file's directory.
fn imports(config: &Path, main: &toml::Table) -> Result<Vec<PathBuf>, ConfigError> {
    let dir = config.parent().unwrap_or(Path::new("/"));
    let mut out = Vec::new();
    let patterns = main.get("imports").and_then(toml::Value::as_array).into_iter().flatten();
    for pattern in patterns.filter_map(toml::Value::as_str) {
        let pattern = dir.join(pattern);
        let name = pattern.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let Some((prefix, suffix)) = name.split_once('*') else {
            out.push(pattern);
            continue;
        };
        let parent = pattern.parent().unwrap_or(Path::new("/"));
        let entries = match std::fs::read_dir(parent) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(ConfigError::Io { path: parent.to_path_buf(), source }),
        };
        let mut found: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                n.len() >= prefix.len() + suffix.len() && n.starts_with(prefix) && n.ends_with(suffix)
            })
            .collect();
        found.sort();
        out.extend(found);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let config = dir.path().join("config.toml");
        (dir, config)
    }

    #[test]
    fn missing_config_means_defaults() {
        let (_d, config) = with(&[]);
        assert_eq!(read(&config).unwrap(), ContentConfig { root: DEFAULT_ROOT.into(), unusable: None });
    }

    #[test]
    fn root_and_imports_later_files_win() {
        let (_d, config) = with(&[
            ("config.toml", "version = 3\nroot = \"/a\"\nimports = [\"conf.d/*.toml\"]\n"),
            ("conf.d/10-x.toml", "root = \"/b\"\n"),
            ("conf.d/20-y.toml", "root = \"/c\"\n"),
            ("conf.d/ignored.conf", "root = \"/d\"\n"),
        ]);
        assert_eq!(read(&config).unwrap().root, PathBuf::from("/c"));
    }

    #[test]
    fn isolated_policy_and_proxy_content_are_unusable() {
        let (_d, config) = with(&[(
            "config.toml",
            "version = 2\n[plugins.\"io.containerd.metadata.v1.bolt\"]\ncontent_sharing_policy = \"isolated\"\n",
        )]);
        assert!(read(&config).unwrap().unusable.unwrap().contains("isolated"));
        let (_d, config) =
            with(&[("config.toml", "[proxy_plugins.remote]\ntype = \"content\"\naddress = \"/run/x.sock\"\n")]);
        assert!(read(&config).unwrap().unusable.unwrap().contains("proxy plugin \"remote\""));
        let (_d, config) = with(&[("config.toml", "root = [")]);
        assert!(read(&config).unwrap_err().to_string().contains("not valid TOML"));
    }
}
