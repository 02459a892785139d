//! The signing-key port: the one place that holds private key material.
//!
//! [`SigningKeys`] signs access tokens with the active key and publishes the
//! public keys (the active one plus verify-only keys published ahead of a
//! rotation) as a JWK Set. `kid` is the RFC 7638 thumbprint of the public
//! key. Implementations: [`FileKeys`] (PKCS#8 PEM files, parsed once, signing
//! straight through aws-lc-rs) and, in `transit`, Vault Transit.

mod file;
mod permissions;
mod transit;

pub use file::{FileKeys, KeyAlg, LoadedKey, generate_pkcs8_pem};
pub use permissions::{KeyFileWarning, check_key_file};
pub use transit::{TransitAuth, TransitConfig, TransitKeys};

use std::sync::Arc;

use async_trait::async_trait;
use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use service_sdk::{ACCESS_TOKEN_TYP, Claims, KeySet};

use crate::clock::SharedClock;
use crate::config::{KeyFile, KeySource};

/// A signing-key failure. Messages never include key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file or key configuration is unusable.
    #[error("key configuration: {0}")]
    Config(String),
    /// A remote signer (Vault) cannot be reached.
    #[error("signer unavailable: {0}")]
    Unavailable(String),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(String),
}

/// The public half of a key set, as verifiers see it.
#[derive(Debug, Clone)]
pub struct PublicKeys {
    /// The JWK Set document (RFC 7517); every key has `kid`, `alg`, `use`.
    pub jwks_json: String,
    /// The same keys, parsed for verification.
    pub keys: KeySet,
}

impl PublicKeys {
    /// Builds both forms from a list of public JWKs (each with kid/alg/use).
    pub fn from_jwks(jwks: Vec<serde_json::Value>) -> Result<Self, KeyError> {
        let jwks_json = serde_json::json!({ "keys": jwks }).to_string();
        let keys = KeySet::from_jwks_json(&jwks_json).map_err(|e| KeyError::Config(e.to_string()))?;
        Ok(Self { jwks_json, keys })
    }
}

/// The signing-key port.
#[async_trait]
pub trait SigningKeys: Send + Sync + 'static {
    /// `claims` as a compact JWS with header `{alg, kid, typ: "at+jwt"}`,
    /// signed by the active key.
    async fn sign(&self, claims: &Claims) -> Result<String, KeyError>;

    /// The current public keys (active and pre-published). Cheap to call.
    fn public_keys(&self) -> Arc<PublicKeys>;

    /// The `kid` new tokens are signed with right now, when known.
    fn signing_kid(&self) -> Option<String> {
        None
    }
}

/// Opens the keys `source` names: reads the PEM files, or logs in to
/// Transit and reads the key (with `clock` for its publish grace period).
/// Key files other users can read are refused unless
/// `allow_readable_key_files`, and other loose modes are logged as
/// warnings (see [`check_key_file`]).
pub async fn open(
    source: &KeySource,
    clock: SharedClock,
    allow_readable_key_files: bool,
) -> Result<Arc<dyn SigningKeys>, KeyError> {
    Ok(match source {
        KeySource::File { signing, publish } => {
            let named = std::iter::once(("keys.signing.path".to_owned(), signing))
                .chain(publish.iter().enumerate().map(|(i, k)| (format!("keys.publish[{i}].path"), k)));
            for (name, file) in named {
                match check_key_file(&name, &file.path, allow_readable_key_files) {
                    Ok(None) => {}
                    Ok(Some(warning)) => tracing::warn!("{warning}"),
                    Err(refused) => return Err(KeyError::Config(refused)),
                }
            }
            Arc::new(FileKeys::open(signing, publish)?)
        }
        KeySource::Transit(cfg) => TransitKeys::open_with_clock(cfg.clone(), clock).await?,
    })
}

impl FileKeys {
    /// Reads the active key and the verify-only keys from their files.
    pub fn open(signing: &KeyFile, publish: &[KeyFile]) -> Result<Self, KeyError> {
        let active = LoadedKey::from_pem_file(signing.alg, &signing.path)?;
        let publish =
            publish.iter().map(|k| LoadedKey::from_pem_file(k.alg, &k.path)).collect::<Result<Vec<_>, _>>()?;
        Self::new(active, publish)
    }
}

/// The base64url JWS protected header for a key.
pub fn encoded_header(alg: &str, kid: &str) -> String {
    let header = serde_json::json!({ "alg": alg, "kid": kid, "typ": ACCESS_TOKEN_TYP });
    URL_SAFE_NO_PAD.encode(header.to_string())
}

/// `base64url(header) "." base64url(claims)`: the bytes a JWS signs.
pub fn signing_input(alg: &str, kid: &str, claims: &Claims) -> Result<String, KeyError> {
    signing_input_with_header(&encoded_header(alg, kid), claims)
}

/// Like [`signing_input`] with a pre-encoded header (saves work per token).
pub fn signing_input_with_header(encoded_header: &str, claims: &Claims) -> Result<String, KeyError> {
    // Sized for a typical token up front: growing the buffers costs more
    // than the serialization itself.
    let mut payload = Vec::with_capacity(512);
    serde_json::to_writer(&mut payload, claims).map_err(|e| KeyError::Sign(e.to_string()))?;
    let mut out = String::with_capacity(encoded_header.len() + 2 + payload.len().div_ceil(3) * 4 + 700);
    out.push_str(encoded_header);
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(&payload, &mut out);
    Ok(out)
}

/// The RFC 7638 JWK thumbprint (SHA-256, base64url) of a public JWK: the
/// required members only, in lexicographic order, no whitespace.
pub fn jwk_thumbprint(jwk: &serde_json::Value) -> String {
    let members: &[&str] = match jwk.get("kty").and_then(|v| v.as_str()) {
        Some("EC") => &["crv", "kty", "x", "y"],
        Some("OKP") => &["crv", "kty", "x"],
        Some("RSA") => &["e", "kty", "n"],
        _ => &["kty"],
    };
    let mut canonical = String::from("{");
    for (i, m) in members.iter().enumerate() {
        if i > 0 {
            canonical.push(',');
        }
        let v = jwk.get(*m).and_then(|v| v.as_str()).unwrap_or("");
        canonical.push_str(&serde_json::Value::String((*m).to_owned()).to_string());
        canonical.push(':');
        canonical.push_str(&serde_json::Value::String(v.to_owned()).to_string());
    }
    canonical.push('}');
    URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, canonical.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprint_matches_rfc7638_example() {
        // RFC 7638 section 3.1.
        let jwk = serde_json::json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        });
        assert_eq!(jwk_thumbprint(&jwk), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
    }
}
