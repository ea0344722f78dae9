//! Talking to an OCI registry, for both wings: docker-config credentials
//! ([`auth`]), the client as preseed configures it, which failures are worth
//! another try, and an error told with its causes. The build wing's
//! `registry` adds bundles.toml's mirrors and per-host settings on top;
//! `preseed push` and `preseed pull` use it as it is.

pub mod auth;

use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;

/// Tries of one request before its error is reported.
pub const ATTEMPTS: u32 = 4;

/// A client with preseed's timeouts: HTTPS, or plain HTTP when `insecure`.
pub fn client(insecure: bool) -> oci_client::Client {
    oci_client::Client::new(ClientConfig {
        protocol: if insecure { ClientProtocol::Http } else { ClientProtocol::Https },
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    })
}

/// The docker config's credentials for `host`, or anonymous.
pub fn credentials(host: &str) -> Result<RegistryAuth, auth::AuthError> {
    Ok(match auth::DockerConfig::from_env()?.credentials(host)? {
        Some(c) => RegistryAuth::Basic(c.username, c.password),
        None => RegistryAuth::Anonymous,
    })
}

/// Rate limits, server errors and dropped connections: worth another try.
pub fn is_transient(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ServerError { code, .. } => *code == 429 || *code >= 500,
        // A 429 with the spec's error body (Docker Hub's rate limit) arrives as an envelope, not a code.
        OciDistributionError::RegistryError { envelope, .. } => {
            envelope.errors.iter().any(|e| e.code == OciErrorCode::Toomanyrequests)
        }
        OciDistributionError::RequestError(e) => e.is_connect() || e.is_timeout() || e.is_request() || e.is_body(),
        OciDistributionError::IoError(_) => true,
        _ => false,
    }
}

/// The error and each cause not already in its text (reqwest's own message
/// is only its kind, "error sending request": the cause is in the chain).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text = format!("{text}: {line}");
        }
        source = cause.source();
    }
    text
}

/// Runs `op` until it succeeds, fails for good, or [`ATTEMPTS`] transient
/// failures in a row, waiting longer after each.
pub async fn retry<T, F, Fut>(mut op: F) -> Result<T, OciDistributionError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Err(e) if is_transient(&e) && attempt + 1 < ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}
