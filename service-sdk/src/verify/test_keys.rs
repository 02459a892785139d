//! Keys generated in-test, and tokens signed with them (unit tests only).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::verify::KeySet;

pub(crate) struct TestKey {
    pub(crate) kid: String,
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

static NEXT_KID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl TestKey {
    pub(crate) fn es256() -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let n = NEXT_KID.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self { kid: format!("test-key-{n}"), pair, rng }
    }

    pub(crate) fn jwk(&self) -> Value {
        let point = self.pair.public_key().as_ref();
        json!({
            "kty": "EC", "crv": "P-256", "kid": self.kid, "alg": "ES256", "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        })
    }

    pub(crate) fn jwks_json(&self) -> String {
        json!({ "keys": [self.jwk()] }).to_string()
    }

    pub(crate) fn key_set(&self) -> KeySet {
        KeySet::from_jwks_json(&self.jwks_json()).unwrap()
    }

    /// The standard header for this key.
    pub(crate) fn header(&self) -> Value {
        json!({ "alg": "ES256", "kid": self.kid, "typ": "at+jwt" })
    }

    /// Signs any header and payload JSON.
    pub(crate) fn sign_raw(&self, header: &Value, payload: &str) -> String {
        let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(payload));
        let sig = self.pair.sign(&self.rng, input.as_bytes()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    pub(crate) fn sign(&self, claims: &Value) -> String {
        self.sign_raw(&self.header(), &claims.to_string())
    }
}

/// Claims valid at `now` for audience `inventory` from `auth-service`.
pub(crate) fn claims(now: u64, jti: &str) -> Value {
    json!({
        "iss": "auth-service", "sub": "alice", "aud": "inventory",
        "exp": now + 300, "nbf": now, "iat": now, "jti": jti, "sid": "s-1",
        "client_id": "order", "perms": ["inventory:read"],
    })
}
