//! The pure validation of one access token against a key set and a clock
//! reading. Every check is explicit and in a fixed order; nothing here does
//! I/O, so the tower layer and the auth server share it.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde::Deserialize;

use super::VerifyError;
use super::keys::{KeySet, parse_header_alg};
use crate::claims::{ACCESS_TOKEN_TYP, Claims};

/// Default largest accepted token, in bytes.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Default clock leeway, in seconds.
pub const DEFAULT_LEEWAY_SECS: u64 = 30;
/// The largest leeway a validator accepts; larger values are capped.
pub const MAX_LEEWAY_SECS: u64 = 300;

/// The rules one service applies to incoming access tokens.
#[derive(Clone, Debug)]
pub struct Validator {
    issuer: String,
    audience: String,
    allowed_algs: Vec<Algorithm>,
    leeway: u64,
    max_token_bytes: usize,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    jku: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    x5u: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    x5c: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    jwk: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    crit: Option<serde::de::IgnoredAny>,
}

impl Validator {
    /// A validator for tokens from `issuer` meant for `audience` (this
    /// service's own name). Allowed algorithms default to ES256, EdDSA,
    /// RS256 and PS256; leeway to 30 s; size limit to 8 KiB.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Self {
            issuer: issuer.into(),
            audience: audience.into(),
            allowed_algs: vec![
                Algorithm::ES256,
                Algorithm::EdDSA,
                Algorithm::RS256,
                Algorithm::PS256,
            ],
            leeway: DEFAULT_LEEWAY_SECS,
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
        }
    }

    /// Restricts the algorithms accepted (each key is still pinned to its own).
    /// Symmetric algorithms are dropped from the list whatever is passed.
    pub fn allowed_algs(mut self, algs: impl IntoIterator<Item = Algorithm>) -> Self {
        self.allowed_algs = algs
            .into_iter()
            .filter(|a| !matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512))
            .collect();
        self
    }

    /// Clock leeway for `exp`, `nbf` and `iat`, capped at 300 s.
    pub fn leeway_secs(mut self, secs: u64) -> Self {
        self.leeway = secs.min(MAX_LEEWAY_SECS);
        self
    }

    /// Largest token accepted, in bytes; larger ones are refused unparsed.
    pub fn max_token_bytes(mut self, bytes: usize) -> Self {
        self.max_token_bytes = bytes;
        self
    }

    /// The expected issuer.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// This service's audience name.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The clock leeway in seconds.
    pub fn leeway(&self) -> u64 {
        self.leeway
    }

    /// The largest token accepted, in bytes.
    pub fn token_limit(&self) -> usize {
        self.max_token_bytes
    }

    /// Validates `token` for this service's audience at time `now` (Unix
    /// seconds).
    pub fn validate(&self, token: &str, keys: &KeySet, now: u64) -> Result<Claims, VerifyError> {
        self.validate_for(token, keys, now, Some(&self.audience))
    }

    /// Validates `token`, checking the audience only when `audience` is set.
    /// The auth server uses `None` for tokens presented as proof of
    /// possession (Revoke), whatever their audience.
    pub fn validate_for(
        &self,
        token: &str,
        keys: &KeySet,
        now: u64,
        audience: Option<&str>,
    ) -> Result<Claims, VerifyError> {
        if token.len() > self.max_token_bytes {
            return Err(VerifyError::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(VerifyError::Malformed);
        };
        if h64.is_empty() || p64.is_empty() || s64.is_empty() {
            return Err(VerifyError::Malformed);
        }
        let header_bytes = URL_SAFE_NO_PAD.decode(h64).map_err(|_| VerifyError::Malformed)?;
        let header: Header = serde_json::from_slice(&header_bytes).map_err(|_| VerifyError::Malformed)?;
        if header.jku.is_some() || header.x5u.is_some() || header.x5c.is_some() || header.jwk.is_some() {
            return Err(VerifyError::ForbiddenHeader);
        }
        if header.crit.is_some() {
            return Err(VerifyError::ForbiddenHeader);
        }
        if header.typ.as_deref() != Some(ACCESS_TOKEN_TYP) {
            return Err(VerifyError::WrongType);
        }
        let alg = parse_header_alg(&header.alg)?;
        let kid = header.kid.ok_or(VerifyError::UnknownKid)?;
        let key = keys.get(&kid).ok_or(VerifyError::UnknownKid)?;
        if key.alg != alg || !self.allowed_algs.contains(&alg) {
            return Err(VerifyError::AlgMismatch);
        }
        let signed_len = h64.len() + 1 + p64.len();
        let message = &token.as_bytes()[..signed_len];
        match jsonwebtoken::crypto::verify(s64, message, &key.key, alg) {
            Ok(true) => {}
            Ok(false) | Err(_) => return Err(VerifyError::BadSignature),
        }
        let payload = URL_SAFE_NO_PAD.decode(p64).map_err(|_| VerifyError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&payload).map_err(|_| VerifyError::BadClaims)?;
        self.check_claims(&claims, now, audience)?;
        Ok(claims)
    }

    /// The claim checks alone (issuer, audience, times, jti), for a token
    /// whose signature is already known good (e.g. from the verified cache).
    pub fn check_claims(&self, claims: &Claims, now: u64, audience: Option<&str>) -> Result<(), VerifyError> {
        if claims.iss != self.issuer {
            return Err(VerifyError::WrongIssuer);
        }
        if let Some(aud) = audience
            && !claims.aud.contains(aud)
        {
            return Err(VerifyError::WrongAudience);
        }
        if claims.exp.saturating_add(self.leeway) <= now {
            return Err(VerifyError::Expired);
        }
        if claims.nbf > now.saturating_add(self.leeway) {
            return Err(VerifyError::NotYetValid);
        }
        if claims.iat > now.saturating_add(self.leeway) {
            return Err(VerifyError::IssuedInFuture);
        }
        if claims.jti.is_empty() {
            return Err(VerifyError::MissingJti);
        }
        Ok(())
    }
}
