//! Signing keys from PKCS#8 PEM files, parsed once and kept parsed: issuance
//! signs straight through aws-lc-rs and never re-parses a key per token.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    self, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use service_sdk::Claims;

use super::{KeyError, PublicKeys, SigningKeys, encoded_header, jwk_thumbprint, signing_input_with_header};

/// A supported signing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum KeyAlg {
    /// ECDSA P-256 with SHA-256 (the default: fast).
    #[default]
    ES256,
    /// Ed25519.
    EdDSA,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PSS with SHA-256.
    PS256,
}

impl KeyAlg {
    /// The JOSE name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlg::ES256 => "ES256",
            KeyAlg::EdDSA => "EdDSA",
            KeyAlg::RS256 => "RS256",
            KeyAlg::PS256 => "PS256",
        }
    }
}

enum Inner {
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
    Rsa(RsaKeyPair, &'static dyn signature::RsaEncoding),
}

/// One parsed private key with its public JWK and pre-encoded JWS header.
pub struct LoadedKey {
    alg: KeyAlg,
    kid: String,
    header: String,
    jwk: serde_json::Value,
    inner: Inner,
}

impl std::fmt::Debug for LoadedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedKey").field("alg", &self.alg).field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl LoadedKey {
    /// Parses a PKCS#8 DER private key for `alg`.
    pub fn from_pkcs8_der(alg: KeyAlg, der: &[u8]) -> Result<Self, KeyError> {
        let bad = |e: &dyn std::fmt::Display| KeyError::Config(format!("not a {} PKCS#8 key: {e}", alg.as_str()));
        let (inner, mut jwk) = match alg {
            KeyAlg::ES256 => {
                let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der).map_err(|e| bad(&e))?;
                let point = kp.public_key().as_ref();
                if point.len() != 65 {
                    return Err(KeyError::Config("unexpected EC public key encoding".into()));
                }
                let jwk = serde_json::json!({
                    "kty": "EC", "crv": "P-256",
                    "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                    "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
                });
                (Inner::Ec(kp), jwk)
            }
            KeyAlg::EdDSA => {
                let kp = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(|e| bad(&e))?;
                let jwk = serde_json::json!({
                    "kty": "OKP", "crv": "Ed25519",
                    "x": URL_SAFE_NO_PAD.encode(kp.public_key().as_ref()),
                });
                (Inner::Ed(kp), jwk)
            }
            KeyAlg::RS256 | KeyAlg::PS256 => {
                let kp = RsaKeyPair::from_pkcs8(der).map_err(|e| bad(&e))?;
                if kp.public_modulus_len() < 256 {
                    return Err(KeyError::Config("RSA keys must be at least 2048 bits".into()));
                }
                let public = kp.public_key();
                let jwk = serde_json::json!({
                    "kty": "RSA",
                    "n": URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
                    "e": URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero()),
                });
                let enc: &'static dyn signature::RsaEncoding =
                    if alg == KeyAlg::RS256 { &signature::RSA_PKCS1_SHA256 } else { &signature::RSA_PSS_SHA256 };
                (Inner::Rsa(kp, enc), jwk)
            }
        };
        let kid = jwk_thumbprint(&jwk);
        if let Some(obj) = jwk.as_object_mut() {
            obj.insert("kid".into(), kid.clone().into());
            obj.insert("alg".into(), alg.as_str().into());
            obj.insert("use".into(), "sig".into());
        }
        Ok(Self { alg, header: encoded_header(alg.as_str(), &kid), kid, jwk, inner })
    }

    /// Reads a PKCS#8 PEM file (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem_file(alg: KeyAlg, path: &Path) -> Result<Self, KeyError> {
        let pem = std::fs::read(path)
            .map_err(|e| KeyError::Config(format!("cannot read key file {}: {e}", path.display())))?;
        Self::from_pem(alg, &pem).map_err(|e| KeyError::Config(format!("{}: {e}", path.display())))
    }

    /// Parses PKCS#8 PEM text.
    pub fn from_pem(alg: KeyAlg, pem: &[u8]) -> Result<Self, KeyError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem)
            .map_err(|_| KeyError::Config("expected a PKCS#8 PEM private key".into()))?;
        Self::from_pkcs8_der(alg, der.secret_pkcs8_der())
    }

    /// The key id (RFC 7638 thumbprint).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The algorithm.
    pub fn alg(&self) -> KeyAlg {
        self.alg
    }

    /// The public JWK (with kid, alg, use).
    pub fn jwk(&self) -> &serde_json::Value {
        &self.jwk
    }

    /// Signs raw bytes with this key (the JWS signature bytes).
    pub fn sign_raw(&self, rng: &SystemRandom, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
        let err = |_| KeyError::Sign("signature operation failed".into());
        match &self.inner {
            Inner::Ec(kp) => kp.sign(rng, msg).map(|s| s.as_ref().to_vec()).map_err(err),
            Inner::Ed(kp) => Ok(kp.sign(msg).as_ref().to_vec()),
            Inner::Rsa(kp, enc) => {
                let mut sig = vec![0u8; kp.public_modulus_len()];
                kp.sign(*enc, rng, msg, &mut sig).map_err(err)?;
                Ok(sig)
            }
        }
    }

    /// Signs `claims` as a compact JWS.
    pub fn sign_claims(&self, rng: &SystemRandom, claims: &Claims) -> Result<String, KeyError> {
        let mut input = signing_input_with_header(&self.header, claims)?;
        let sig = self.sign_raw(rng, input.as_bytes())?;
        input.push('.');
        URL_SAFE_NO_PAD.encode_string(sig, &mut input);
        Ok(input)
    }
}

/// Generates a fresh private key as PKCS#8 PEM (dev mode, tests, `keygen`).
pub fn generate_pkcs8_pem(alg: KeyAlg) -> Result<String, KeyError> {
    use aws_lc_rs::encoding::AsDer as _;
    let rng = SystemRandom::new();
    let err = |_| KeyError::Config("key generation failed".into());
    let der: Vec<u8> = match alg {
        KeyAlg::ES256 => {
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).map_err(err)?.as_ref().to_vec()
        }
        KeyAlg::EdDSA => Ed25519KeyPair::generate_pkcs8(&rng).map_err(err)?.as_ref().to_vec(),
        KeyAlg::RS256 | KeyAlg::PS256 => {
            let kp = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).map_err(err)?;
            kp.as_der().map_err(err)?.as_ref().to_vec()
        }
    };
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(chunk));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    Ok(pem)
}

struct Ring {
    active: LoadedKey,
    public: Arc<PublicKeys>,
}

/// File-based keys: one active signing key plus verify-only published keys.
/// [`FileKeys::replace`] swaps the set atomically (rotation without restart).
pub struct FileKeys {
    ring: ArcSwap<Ring>,
    rng: SystemRandom,
}

impl FileKeys {
    /// A key set from an active key and verify-only keys.
    pub fn new(active: LoadedKey, publish: Vec<LoadedKey>) -> Result<Self, KeyError> {
        Ok(Self { ring: ArcSwap::from_pointee(Self::ring(active, publish)?), rng: SystemRandom::new() })
    }

    fn ring(active: LoadedKey, publish: Vec<LoadedKey>) -> Result<Ring, KeyError> {
        let mut jwks = vec![active.jwk().clone()];
        for k in &publish {
            if k.kid() != active.kid() {
                jwks.push(k.jwk().clone());
            }
        }
        Ok(Ring { public: Arc::new(PublicKeys::from_jwks(jwks)?), active })
    }

    /// Replaces the whole set at once: in-flight signatures finish with the
    /// old key, new ones use the new active key.
    pub fn replace(&self, active: LoadedKey, publish: Vec<LoadedKey>) -> Result<(), KeyError> {
        self.ring.store(Arc::new(Self::ring(active, publish)?));
        Ok(())
    }

    /// The active key's id.
    pub fn active_kid(&self) -> String {
        self.ring.load().active.kid().to_owned()
    }
}

#[async_trait]
impl SigningKeys for FileKeys {
    async fn sign(&self, claims: &Claims) -> Result<String, KeyError> {
        self.ring.load().active.sign_claims(&self.rng, claims)
    }

    fn public_keys(&self) -> Arc<PublicKeys> {
        self.ring.load().public.clone()
    }

    fn signing_kid(&self) -> Option<String> {
        Some(self.active_kid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use service_sdk::{Audience, Validator};

    fn claims() -> Claims {
        Claims {
            iss: "auth-service".into(),
            sub: "alice".into(),
            aud: Audience::One("order".into()),
            exp: 2_000,
            nbf: 1_000,
            iat: 1_000,
            jti: "j1".into(),
            sid: None,
            client_id: "c".into(),
            role: None,
            perms: vec![],
            act: None,
            cnf: None,
        }
    }

    #[test]
    fn every_algorithm_signs_tokens_that_verify_against_its_jwks() {
        for alg in [KeyAlg::ES256, KeyAlg::EdDSA, KeyAlg::RS256, KeyAlg::PS256] {
            let pem = generate_pkcs8_pem(alg).unwrap();
            let key = LoadedKey::from_pem(alg, pem.as_bytes()).unwrap();
            let keys = FileKeys::new(key, vec![]).unwrap();
            let token = keys.ring.load().active.sign_claims(&keys.rng, &claims()).unwrap();
            let public = keys.public_keys();
            let got = Validator::new("auth-service", "order").validate(&token, &public.keys, 1_500).unwrap();
            assert_eq!(got, claims(), "{alg:?}");
            assert!(public.jwks_json.contains(alg.as_str()));
        }
    }

    #[test]
    fn a_key_of_the_wrong_type_is_refused() {
        let pem = generate_pkcs8_pem(KeyAlg::EdDSA).unwrap();
        assert!(LoadedKey::from_pem(KeyAlg::ES256, pem.as_bytes()).is_err());
        assert!(LoadedKey::from_pem(KeyAlg::ES256, b"garbage").is_err());
    }
}
