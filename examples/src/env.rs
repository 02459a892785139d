//! Where an example service finds its mTLS material and credentials: a dev
//! directory laid out by `auth-server dev` (or, in a cluster, files mounted
//! by cert-manager and rendered by Vault Agent at the same relative names).

use std::path::{Path, PathBuf};

use service_sdk::{AuthServerId, FileCredentials, MtlsFiles};
use tonic::transport::{Certificate, Channel, Identity, ServerTlsConfig};

/// Where one service finds its certificate, key, CA and credentials.
#[derive(Debug, Clone)]
pub struct ServiceEnv {
    /// This service's name (`order`, `inventory`).
    pub name: String,
    /// The auth server's gRPC URI, e.g. `https://127.0.0.1:50051`.
    pub auth_uri: String,
    /// The auth server's identity, the SPIFFE ID in its certificate. `None`:
    /// `spiffe://<trust domain>/auth-server`, in the trust domain of this
    /// service's own certificate.
    pub auth_server_id: Option<String>,
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
            auth_server_id: None,
            ca: dir.join("ca.pem"),
            cert: dir.join("clients").join(format!("{name}.pem")),
            key: dir.join("clients").join(format!("{name}-key.pem")),
            credentials: dir.join("credentials").join(format!("{name}.json")),
        }
    }

    /// From the environment, as the deploy manifests set it: `AUTH_URL`,
    /// `AUTH_SERVER_ID`, `AUTH_TLS_CA`, `AUTH_TLS_CERT`, `AUTH_TLS_KEY`,
    /// `AUTH_CREDENTIALS_FILE`. Each one that is unset falls back to the dev
    /// layout under `AUTH_DEV_DIR` (default `.auth-dev`); an unset
    /// `AUTH_SERVER_ID` to the auth server in this service's trust domain.
    pub fn from_env(name: &str) -> Self {
        let var = |k: &str| std::env::var_os(k).map(PathBuf::from);
        let dev = Self::new(
            var("AUTH_DEV_DIR").unwrap_or_else(|| PathBuf::from(".auth-dev")),
            name,
            std::env::var("AUTH_URL").unwrap_or_else(|_| "https://127.0.0.1:50051".into()),
        );
        Self {
            auth_server_id: std::env::var("AUTH_SERVER_ID").ok(),
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

    /// The auth server's identity this service demands.
    pub fn auth_server_id(&self) -> Result<AuthServerId, EnvError> {
        match &self.auth_server_id {
            Some(id) => AuthServerId::new(id).map_err(|e| EnvError::new("AUTH_SERVER_ID", e)),
            None => self.mtls().auth_server_id().map_err(|e| EnvError::new("auth server identity", e)),
        }
    }

    /// An mTLS channel to the auth server, which must prove its identity
    /// ([`auth_server_id`](Self::auth_server_id)): no other service of the
    /// mesh can answer in its place.
    pub fn auth_channel(&self) -> Result<Channel, EnvError> {
        let id = self.auth_server_id()?;
        self.mtls().auth_channel_as(&self.auth_uri, &id).map_err(|e| EnvError::new("auth channel", e))
    }

    /// An mTLS channel to the example service `service` at `uri`, whose
    /// certificate names it (DNS SAN `service`).
    pub fn channel_to(&self, uri: &str, service: &str) -> Result<Channel, EnvError> {
        self.mtls().channel(uri, service).map_err(|e| EnvError::new("service channel", e))
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
