//! Where a service's own credentials come from: the environment, mounted
//! files, or Vault.

mod env;
mod file;
#[cfg(feature = "vault")]
mod vault;

use std::path::PathBuf;

use async_trait::async_trait;

pub use env::{CLIENT_ID_VAR, CLIENT_SECRET_VAR, EnvCredentials};
pub use file::FileCredentials;
#[cfg(feature = "vault")]
pub use vault::{KUBERNETES_JWT_PATH, SecretSource, VaultAuth, VaultCredentials, VaultCredentialsBuilder};

use super::secret::ClientCredentials;

/// A source of the service's client credentials.
///
/// [`TokenSource`](super::TokenSource) calls [`current`](Credentials::current)
/// before each exchange, and [`refresh`](Credentials::refresh) when the auth
/// service answered `UNAUTHENTICATED`: a source that can change (a file, a
/// Vault path) re-reads it then, so a rotated secret is picked up without a
/// restart.
#[async_trait]
pub trait Credentials: Send + Sync + 'static {
    /// The current credentials. Cheap when nothing changed.
    async fn current(&self) -> Result<ClientCredentials, CredentialsError>;

    /// Re-reads the source after the auth service rejected the credentials
    /// and returns what is there now. The default returns
    /// [`current`](Credentials::current).
    async fn refresh(&self) -> Result<ClientCredentials, CredentialsError> {
        self.current().await
    }
}

/// Fixed credentials, e.g. handed over by a test or a config value.
#[async_trait]
impl Credentials for ClientCredentials {
    async fn current(&self) -> Result<ClientCredentials, CredentialsError> {
        Ok(self.clone())
    }
}

/// Why credentials could not be read. Messages name variables and paths,
/// never values.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    /// A required environment variable is unset or empty.
    #[error("environment variable {0} is not set")]
    MissingVar(String),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file holds no complete credentials (it may be half-written).
    #[error("{path} does not hold complete credentials")]
    Parse {
        /// The file.
        path: PathBuf,
    },
    /// Vault refused or could not be reached.
    #[error("vault: {0}")]
    Vault(String),
}
