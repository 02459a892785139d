//! A verified set of public keys, each pinned to exactly one algorithm.

use std::collections::HashMap;

use jsonwebtoken::jwk::{JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};

use super::VerifyError;

/// One public key and the one algorithm it may verify.
#[derive(Clone)]
pub struct VerifyKey {
    /// The algorithm pinned to this key (from the JWK's `alg`).
    pub alg: Algorithm,
    /// The parsed public key.
    pub key: DecodingKey,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey").field("alg", &self.alg).finish_non_exhaustive()
    }
}

/// Public keys by `kid`. Built from a JWK Set; keys without a `kid`, without
/// an `alg`, with a symmetric or unknown `alg`, or with `use` other than `sig`
/// are left out, so a key can never verify with an algorithm it was not
/// published for.
#[derive(Clone, Debug, Default)]
pub struct KeySet {
    keys: HashMap<String, VerifyKey>,
}

impl KeySet {
    /// Parses a JWK Set document (RFC 7517).
    pub fn from_jwks_json(json: &str) -> Result<Self, VerifyError> {
        let set: JwkSet = serde_json::from_str(json).map_err(|_| VerifyError::BadJwks)?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                tracing::warn!("JWKS key without kid ignored");
                continue;
            };
            if let Some(u) = &jwk.common.public_key_use
                && *u != jsonwebtoken::jwk::PublicKeyUse::Signature
            {
                continue;
            }
            let Some(alg) = jwk.common.key_algorithm.and_then(asymmetric_alg) else {
                tracing::warn!(kid = %kid, "JWKS key without a usable asymmetric alg ignored");
                continue;
            };
            let key = match DecodingKey::from_jwk(jwk) {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(kid = %kid, error = %e, "JWKS key could not be parsed");
                    continue;
                }
            };
            keys.insert(kid, VerifyKey { alg, key });
        }
        Ok(Self { keys })
    }

    /// Adds or replaces one key.
    pub fn insert(&mut self, kid: impl Into<String>, key: VerifyKey) {
        self.keys.insert(kid.into(), key);
    }

    /// The key with this `kid`.
    pub fn get(&self, kid: &str) -> Option<&VerifyKey> {
        self.keys.get(kid)
    }

    /// Whether the set holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The key ids.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
}

/// Maps a JWK `alg` to a JWS algorithm, refusing symmetric and encryption ones.
fn asymmetric_alg(a: KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        _ => return None,
    })
}

/// Parses a JWS header `alg` value; `none` and every HS* are refused.
pub(crate) fn parse_header_alg(alg: &str) -> Result<Algorithm, VerifyError> {
    Ok(match alg {
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        _ => return Err(VerifyError::ForbiddenAlg),
    })
}
