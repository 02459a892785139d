//! A verified set of public keys, each pinned to exactly one algorithm.

use std::collections::HashMap;

use aws_lc_rs::digest;
use jsonwebtoken::jwk::{JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind};

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

/// Names one published key exactly: a digest of its `kid`, its algorithm
/// and its public key material. The verified-token cache keeps the
/// fingerprint of the key that checked each cached signature, and a hit
/// counts only while the current key set still holds that fingerprint: a
/// key removed from the JWKS, or another key published under the same
/// `kid`, takes its cached tokens with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KeyFingerprint(u64);

impl KeyFingerprint {
    fn of(kid: &str, key: &VerifyKey) -> Self {
        let mut ctx = digest::Context::new(&digest::SHA256);
        let mut field = |bytes: &[u8]| {
            // Length-prefixed, so no two field lists digest alike.
            ctx.update(&(bytes.len() as u64).to_be_bytes());
            ctx.update(bytes);
        };
        field(kid.as_bytes());
        field(format!("{:?}", key.alg).as_bytes());
        match key.key.kind() {
            DecodingKeyKind::SecretOrDer(der) => field(der),
            DecodingKeyKind::RsaModulusExponent { n, e } => {
                field(n);
                field(e);
            }
        }
        let d = ctx.finish();
        let mut first = [0u8; 8];
        first.copy_from_slice(&d.as_ref()[..8]);
        Self(u64::from_be_bytes(first))
    }
}

#[cfg(test)]
impl KeyFingerprint {
    /// A fingerprint of no real key.
    pub(crate) const TEST: Self = Self(1);
}

#[derive(Clone, Debug)]
struct Slot {
    key: VerifyKey,
    fingerprint: KeyFingerprint,
}

/// Public keys by `kid`. Built from a JWK Set; keys without a `kid`, without
/// an `alg`, with a symmetric or unknown `alg`, or with `use` other than `sig`
/// are left out, so a key can never verify with an algorithm it was not
/// published for.
#[derive(Clone, Debug, Default)]
pub struct KeySet {
    keys: HashMap<String, Slot>,
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
            let key = VerifyKey { alg, key };
            let fingerprint = KeyFingerprint::of(&kid, &key);
            keys.insert(kid, Slot { key, fingerprint });
        }
        Ok(Self { keys })
    }

    /// Adds or replaces one key.
    pub fn insert(&mut self, kid: impl Into<String>, key: VerifyKey) {
        let kid = kid.into();
        let fingerprint = KeyFingerprint::of(&kid, &key);
        self.keys.insert(kid, Slot { key, fingerprint });
    }

    /// The key with this `kid`.
    pub fn get(&self, kid: &str) -> Option<&VerifyKey> {
        self.keys.get(kid).map(|s| &s.key)
    }

    /// The key with this `kid`, and its fingerprint.
    pub(crate) fn get_with_fingerprint(&self, kid: &str) -> Option<(&VerifyKey, KeyFingerprint)> {
        self.keys.get(kid).map(|s| (&s.key, s.fingerprint))
    }

    /// Whether the key with this fingerprint is in the set (a scan: key
    /// sets hold a handful of keys).
    pub(crate) fn holds(&self, fingerprint: KeyFingerprint) -> bool {
        self.keys.values().any(|s| s.fingerprint == fingerprint)
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::verify::test_keys::TestKey;

    fn fingerprint(set: &KeySet, kid: &str) -> KeyFingerprint {
        set.get_with_fingerprint(kid).unwrap().1
    }

    #[test]
    fn fingerprints_name_kid_and_key_material() {
        let (a, b) = (TestKey::es256(), TestKey::es256());
        let set = KeySet::from_jwks_json(&json!({ "keys": [a.jwk(), b.jwk()] }).to_string()).unwrap();
        let (fa, fb) = (fingerprint(&set, &a.kid), fingerprint(&set, &b.kid));
        assert_ne!(fa, fb);
        assert!(set.holds(fa) && set.holds(fb));
        // The same key parsed again has the same fingerprint.
        assert_eq!(fingerprint(&a.key_set(), &a.kid), fa);
        // b's material under a's kid is another key.
        let mut swapped = b.jwk();
        swapped["kid"] = json!(a.kid);
        let other = KeySet::from_jwks_json(&json!({ "keys": [swapped] }).to_string()).unwrap();
        assert!(!other.holds(fa) && !other.holds(fb));
        // Replacing a key by insert drops the old fingerprint.
        let mut set = set;
        set.insert(a.kid.clone(), other.get(&a.kid).unwrap().clone());
        assert!(!set.holds(fa) && set.holds(fb));
    }
}
