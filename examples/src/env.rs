//! Where an example service finds its mTLS material and credentials: a dev
//! directory laid out by `auth-server dev` (or, in a cluster, files mounted
//! by cert-manager and rendered by Vault Agent at the same relative names).

use std::path::{Path, PathBuf};

use service_sdk::{FileCredentials, MtlsFiles};
use tonic::transport::{Certificate, Channel, Identity, ServerTlsConfig};

/// One service's view of the dev environment.
#[derive(Debug, Clone)]
pub struct ServiceEnv {
    /// The dev directory.
    pub dir: PathBuf,
    /// This service's name (`order`, `inventory`).
    pub name: String,
    /// The auth server's gRPC URI, e.g. `https://127.0.0.1:50051`.
    pub auth_uri: String,
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
    /// The environment of service `name` in `dir`, talking to `auth_uri`.
    pub fn new(dir: impl AsRef<Path>, name: &str, auth_uri: impl Into<String>) -> Self {
        Self { dir: dir.as_ref().to_owned(), name: name.into(), auth_uri: auth_uri.into() }
    }

    /// This service's certificate, key and the CA, as files the SDK watches.
    pub fn mtls(&self) -> MtlsFiles {
        MtlsFiles::new(
            self.dir.join("ca.pem"),
            self.dir.join("clients").join(format!("{}.pem", self.name)),
            self.dir.join("clients").join(format!("{}-key.pem", self.name)),
        )
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
        FileCredentials::document(self.dir.join("credentials").join(format!("{}.json", self.name)))
    }

    /// Server-side mTLS for this service's own gRPC port: its certificate,
    /// and client certificates required from the same CA.
    pub fn server_tls(&self) -> Result<ServerTlsConfig, EnvError> {
        let read = |p: PathBuf| std::fs::read(&p).map_err(|e| EnvError::new(p.display().to_string(), e));
        let cert = read(self.dir.join("clients").join(format!("{}.pem", self.name)))?;
        let key = read(self.dir.join("clients").join(format!("{}-key.pem", self.name)))?;
        let ca = read(self.dir.join("ca.pem"))?;
        Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)).client_ca_root(Certificate::from_pem(ca)))
    }
}
