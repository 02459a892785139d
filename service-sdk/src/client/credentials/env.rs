//! Credentials from environment variables.

use async_trait::async_trait;

use super::{Credentials, CredentialsError};
use crate::client::secret::ClientCredentials;

/// The variable holding the client id.
pub const CLIENT_ID_VAR: &str = "AUTH_CLIENT_ID";
/// The variable holding the client secret.
pub const CLIENT_SECRET_VAR: &str = "AUTH_CLIENT_SECRET";

/// Credentials from `AUTH_CLIENT_ID` and `AUTH_CLIENT_SECRET`, read once when
/// built (the environment of a running process does not change).
#[derive(Debug, Clone)]
pub struct EnvCredentials {
    creds: ClientCredentials,
}

impl EnvCredentials {
    /// Reads `AUTH_CLIENT_ID` and `AUTH_CLIENT_SECRET`.
    pub fn from_env() -> Result<Self, CredentialsError> {
        Self::from_vars(CLIENT_ID_VAR, CLIENT_SECRET_VAR)
    }

    /// Reads the two named variables.
    pub fn from_vars(id_var: &str, secret_var: &str) -> Result<Self, CredentialsError> {
        Self::from_lookup(id_var, secret_var, |k| std::env::var(k).ok())
    }

    /// Reads the two named variables through `lookup` (for tests and for
    /// environments kept in a map).
    pub fn from_lookup(
        id_var: &str,
        secret_var: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, CredentialsError> {
        let get = |k: &str| {
            lookup(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| CredentialsError::MissingVar(k.to_owned()))
        };
        Ok(Self { creds: ClientCredentials::new(get(id_var)?, get(secret_var)?) })
    }
}

#[async_trait]
impl Credentials for EnvCredentials {
    async fn current(&self) -> Result<ClientCredentials, CredentialsError> {
        Ok(self.creds.clone())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn env_credentials_read_both_variables() {
        let env = |k: &str| match k {
            "AUTH_CLIENT_ID" => Some("order".to_owned()),
            "AUTH_CLIENT_SECRET" => Some("s3cret\n".to_owned()),
            _ => None,
        };
        let c = EnvCredentials::from_lookup(CLIENT_ID_VAR, CLIENT_SECRET_VAR, env).unwrap();
        let got = c.current().await.unwrap();
        assert_eq!(got, ClientCredentials::new("order", "s3cret"));
    }

    #[test]
    fn missing_env_secret_names_the_variable() {
        let env = |k: &str| (k == "AUTH_CLIENT_ID").then(|| "order".to_owned());
        let err = EnvCredentials::from_lookup(CLIENT_ID_VAR, CLIENT_SECRET_VAR, env).unwrap_err();
        assert_eq!(err.to_string(), "environment variable AUTH_CLIENT_SECRET is not set");
    }
}
