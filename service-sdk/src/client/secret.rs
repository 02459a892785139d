//! Secret values that redact themselves.

use std::fmt;
use std::sync::Arc;

use subtle::ConstantTimeEq as _;

/// A service account's client secret. `Debug` prints `ClientSecret(..)`; there
/// is no `Display`, so the value reaches a log only through an explicit
/// [`ClientSecret::expose`].
#[derive(Clone)]
pub struct ClientSecret(Arc<str>);

impl ClientSecret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(Arc::from(value.into()))
    }

    /// The secret value, for sending it to the auth service.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientSecret(..)")
    }
}

impl PartialEq for ClientSecret {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for ClientSecret {}

/// A service account's credentials: its client id and secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCredentials {
    /// The client id, e.g. `order`. Not secret.
    pub client_id: String,
    /// The client secret.
    pub client_secret: ClientSecret,
}

impl ClientCredentials {
    /// Credentials from an id and a secret.
    pub fn new(client_id: impl Into<String>, client_secret: impl Into<String>) -> Self {
        Self { client_id: client_id.into(), client_secret: ClientSecret::new(client_secret) }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn client_secret_debug_is_redacted() {
        let c = ClientCredentials::new("order", "s3cr3t-value");
        let shown = format!("{c:?}");
        assert!(shown.contains("ClientSecret(..)"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert_eq!(c.client_secret.expose(), "s3cr3t-value");
    }

    #[test]
    fn client_secrets_compare_by_value() {
        assert_eq!(ClientSecret::new("a"), ClientSecret::new("a"));
        assert_ne!(ClientSecret::new("a"), ClientSecret::new("b"));
    }
}
