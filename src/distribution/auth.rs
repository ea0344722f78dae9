//! Registry credentials from the docker config, as `docker login` leaves
//! them: `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`, with inline
//! `auths`, per-host `credHelpers` and a default `credsStore`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde::Deserialize;

/// Credentials for one registry host.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

/// A docker config that exists but cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Unreadable or malformed file.
    #[error("docker config {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A credential helper failed.
    #[error("credential helper docker-credential-{helper} for {host}: {message}")]
    Helper {
        /// Helper name.
        helper: String,
        /// Registry host.
        host: String,
        /// What happened.
        message: String,
    },
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
}

/// The docker config in effect.
#[derive(Default)]
pub struct DockerConfig {
    path: Option<PathBuf>,
    file: ConfigFile,
}

impl DockerConfig {
    /// Loads `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`; a
    /// missing file means anonymous access everywhere.
    pub fn from_env() -> Result<Self, AuthError> {
        let dir = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")));
        match dir {
            Some(dir) if dir.join("config.json").is_file() => Self::load(&dir.join("config.json")),
            _ => Ok(Self::default()),
        }
    }

    /// Loads a specific config file.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let err = |message: String| AuthError::Config { path: path.to_path_buf(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let file: ConfigFile = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        Ok(DockerConfig { path: Some(path.to_path_buf()), file })
    }

    /// Credentials for `host`, if the config has any.
    pub fn credentials(&self, host: &str) -> Result<Option<Credentials>, AuthError> {
        let keys = host_keys(host);
        if let Some(helper) = keys.iter().find_map(|k| self.file.cred_helpers.get(k)) {
            return run_helper(helper, host);
        }
        for key in &keys {
            if let Some(entry) = self.file.auths.get(key) {
                return self.decode(host, entry).map(Some);
            }
        }
        match &self.file.creds_store {
            Some(store) => run_helper(store, host),
            None => Ok(None),
        }
    }

    fn decode(&self, host: &str, entry: &AuthEntry) -> Result<Credentials, AuthError> {
        let err = |message: String| AuthError::Config { path: self.path.clone().unwrap_or_default(), message };
        if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
            return Ok(Credentials { username: u.clone(), password: p.clone() });
        }
        if let Some(token) = &entry.identity_token {
            return Ok(Credentials { username: "<token>".into(), password: token.clone() });
        }
        let auth = entry.auth.as_deref().ok_or_else(|| err(format!("auths.{host:?} has no auth")))?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| err(format!("auths.{host:?}.auth is not base64: {e}")))?;
        let raw = String::from_utf8(raw).map_err(|_| err(format!("auths.{host:?}.auth is not UTF-8")))?;
        let (u, p) = raw.split_once(':').ok_or_else(|| err(format!("auths.{host:?}.auth is not user:password")))?;
        Ok(Credentials { username: u.to_string(), password: p.to_string() })
    }
}

/// Keys a host may be stored under (docker.io has historical spellings).
fn host_keys(host: &str) -> Vec<String> {
    let mut keys = vec![host.to_string(), format!("https://{host}"), format!("http://{host}")];
    if host == "docker.io" {
        keys.extend(["https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io"].map(String::from));
    }
    keys
}

fn run_helper(helper: &str, host: &str) -> Result<Option<Credentials>, AuthError> {
    let err = |message: String| AuthError::Helper { helper: helper.into(), host: host.into(), message };
    let mut child = Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("cannot run it: {e}")))?;
    child.stdin.take().expect("piped").write_all(host.as_bytes()).map_err(|e| err(e.to_string()))?;
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        // The helper protocol reports "not found" on stdout; treat as anonymous.
        if stdout.contains("credentials not found") || stderr.contains("credentials not found") {
            return Ok(None);
        }
        return Err(err(format!("exited with {}: {}", out.status, stderr.trim())));
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct HelperOutput {
        username: String,
        secret: String,
    }
    let parsed: HelperOutput = serde_json::from_slice(&out.stdout).map_err(|e| err(format!("bad output: {e}")))?;
    Ok(Some(Credentials { username: parsed.username, password: parsed.secret }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_auth_decodes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"auths":{"127.0.0.1:5000":{"auth":"dXNlcjpwYXNz"}}}"#).unwrap();
        let cfg = DockerConfig::load(&path).unwrap();
        let c = cfg.credentials("127.0.0.1:5000").unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("user", "pass"));
        assert!(cfg.credentials("other:5000").unwrap().is_none());
    }
}
