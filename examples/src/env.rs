//! Where an example service finds its mTLS material and credentials: a dev
//! directory laid out by `auth-server dev` (or, in a cluster, files mounted
//! by cert-manager and rendered by Vault Agent at the same relative names).

use std::path::{Path, PathBuf};

use service_sdk::{FileCredentials, MtlsFiles};
use tonic::transport::{Certificate, Channel, Identity, ServerTlsConfig};

/// Where one service finds its certificate, key, CA and credentials.
#[derive(Debug, Clone)]
pub struct ServiceEnv {
    /// This service's name (`order`, `inventory`).
    pub name: String,
    /// The auth server's gRPC URI, e.g. `https://127.0.0.1:50051`.
    pub auth_uri: String,
    /// CA bundle (PEM).
    pub ca: PathBuf,
    /// This service's certificate (PEM).
    pub cert: PathBuf,
    /// This service's private key (PEM).
    pub key: PathBuf,
    /// Service-account credentials file (JSON), as Vault Agent renders it.
    pub credentials: PathBuf,
}

/// Failure to read the environment.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {detail}")]
pub struct EnvError {
    what: String,
    detail: String,
}

impl EnvError {
    pub(crate) fn new(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Self { what: what.into(), detail: detail.to_string() }
    }
}

impl ServiceEnv {
    /// The environment of service `name` in the dev directory `dir` (as
    /// `auth-server dev` lays it out), talking to `auth_uri`.
    pub fn new(dir: impl AsRef<Path>, name: &str, auth_uri: impl Into<String>) -> Self {
        let dir = dir.as_ref();
        Self {
            name: name.into(),
            auth_uri: auth_uri.into(),
            ca: dir.join("ca.pem"),
            cert: dir.join("clients").join(format!("{name}.pem")),
            key: dir.join("clients").join(format!("{name}-key.pem")),
            credentials: dir.join("credentials").join(format!("{name}.json")),
        }
    }

    /// From the environment, as the deploy manifests set it: `AUTH_URL`,
    /// `AUTH_TLS_CA`, `AUTH_TLS_CERT`, `AUTH_TLS_KEY`, `AUTH_CREDENTIALS_FILE`.
    /// Each one that is unset falls back to the dev layout under
    /// `AUTH_DEV_DIR` (default `.auth-dev`).
    pub fn from_env(name: &str) -> Self {
        let var = |k: &str| std::env::var_os(k).map(PathBuf::from);
        let dev = Self::new(
            var("AUTH_DEV_DIR").unwrap_or_else(|| PathBuf::from(".auth-dev")),
            name,
            std::env::var("AUTH_URL").unwrap_or_else(|_| "https://127.0.0.1:50051".into()),
        );
        Self {
            ca: var("AUTH_TLS_CA").unwrap_or(dev.ca.clone()),
            cert: var("AUTH_TLS_CERT").unwrap_or(dev.cert.clone()),
            key: var("AUTH_TLS_KEY").unwrap_or(dev.key.clone()),
            credentials: var("AUTH_CREDENTIALS_FILE").unwrap_or(dev.credentials.clone()),
            ..dev
        }
    }

    /// This service's certificate, key and the CA, as files the SDK watches.
    pub fn mtls(&self) -> MtlsFiles {
        MtlsFiles::new(&self.ca, &self.cert, &self.key)
    }

    /// An mTLS channel to the auth server.
    pub fn auth_channel(&self) -> Result<Channel, EnvError> {
        self.mtls().channel(&self.auth_uri, "localhost").map_err(|e| EnvError::new("auth channel", e))
    }

    /// An mTLS channel to another example service at `uri`.
    pub fn channel_to(&self, uri: &str) -> Result<Channel, EnvError> {
        self.mtls().channel(uri, "localhost").map_err(|e| EnvError::new("service channel", e))
    }

    /// The service-account credentials file, as Vault Agent would render it.
    pub fn credentials(&self) -> FileCredentials {
        FileCredentials::document(&self.credentials)
    }

    /// Server-side mTLS for this service's own gRPC port: its certificate,
    /// and client certificates required from the same CA.
    pub fn server_tls(&self) -> Result<ServerTlsConfig, EnvError> {
        let read = |p: PathBuf| std::fs::read(&p).map_err(|e| EnvError::new(p.display().to_string(), e));
        let cert = read(self.cert.clone())?;
        let key = read(self.key.clone())?;
        let ca = read(self.ca.clone())?;
        Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)).client_ca_root(Certificate::from_pem(ca)))
    }
}
