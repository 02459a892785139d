//! The pure validation of one access token against a key set and a clock
//! reading. Every check is explicit and in a fixed order; nothing here does
//! I/O, so the tower layer and the auth server share it.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde::Deserialize;

use super::VerifyError;
use super::keys::{KeyFingerprint, KeySet, parse_header_alg};
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
            allowed_algs: vec![Algorithm::ES256, Algorithm::EdDSA, Algorithm::RS256, Algorithm::PS256],
            leeway: DEFAULT_LEEWAY_SECS,
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
        }
    }

    /// Restricts the algorithms accepted (each key is still pinned to its own).
    /// Symmetric algorithms are dropped from the list whatever is passed.
    pub fn allowed_algs(mut self, algs: impl IntoIterator<Item = Algorithm>) -> Self {
        self.allowed_algs =
            algs.into_iter().filter(|a| !matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)).collect();
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
        self.validate_keyed(token, keys, now, audience).map(|(claims, _)| claims)
    }

    /// Like [`validate_for`](Self::validate_for), also naming the key that
    /// checked the signature.
    pub(crate) fn validate_keyed(
        &self,
        token: &str,
        keys: &KeySet,
        now: u64,
        audience: Option<&str>,
    ) -> Result<(Claims, KeyFingerprint), VerifyError> {
        if token.len() > self.max_token_bytes {
            return Err(VerifyError::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
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
        let (key, fingerprint) = keys.get_with_fingerprint(&kid).ok_or(VerifyError::UnknownKid)?;
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
        Ok((claims, fingerprint))
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::verify::test_keys::{TestKey, claims};

    const NOW: u64 = 1_700_000_000;

    fn validator() -> Validator {
        Validator::new("auth-service", "inventory")
    }

    fn with(k: &str, v: Value) -> Value {
        let mut c = claims(NOW, "j");
        c[k] = v;
        c
    }

    fn header_with(key: &TestKey, k: &str, v: Value) -> Value {
        let mut h = key.header();
        h[k] = v;
        h
    }

    fn check(key: &TestKey, token: &str) -> Result<Claims, VerifyError> {
        validator().validate(token, &key.key_set(), NOW)
    }

    #[test]
    fn valid_token_is_accepted_with_its_claims() {
        let key = TestKey::es256();
        let c = check(&key, &key.sign(&claims(NOW, "j1"))).unwrap();
        assert_eq!((c.sub.as_str(), c.jti.as_str()), ("alice", "j1"));
        check(&key, &key.sign(&with("aud", json!(["order", "inventory"])))).unwrap();
    }

    #[test]
    fn size_limit_is_checked_before_parsing() {
        let key = TestKey::es256();
        let big = "x".repeat(DEFAULT_MAX_TOKEN_BYTES + 1);
        assert_eq!(check(&key, &big), Err(VerifyError::TooLarge));
        let token = key.sign(&claims(NOW, "j"));
        let tight = validator().max_token_bytes(token.len() - 1);
        assert_eq!(tight.validate(&token, &key.key_set(), NOW), Err(VerifyError::TooLarge));
    }

    #[test]
    fn structure_must_be_three_base64url_parts_with_a_json_header() {
        let key = TestKey::es256();
        for t in ["", "..", "a.b", "a.b.c.d", "!!!.@@@.###", "a..c", "e30.e30."] {
            assert_eq!(check(&key, t), Err(VerifyError::Malformed), "{t:?}");
        }
    }

    #[test]
    fn none_and_symmetric_algorithms_are_forbidden() {
        let key = TestKey::es256();
        for alg in ["none", "None", "HS256", "HS384", "HS512", "XYZ"] {
            let t = key.sign_raw(&header_with(&key, "alg", json!(alg)), &claims(NOW, "j").to_string());
            assert_eq!(check(&key, &t), Err(VerifyError::ForbiddenAlg), "{alg}");
        }
    }

    #[test]
    fn header_alg_must_equal_the_keys_pinned_alg_and_be_allowed() {
        let key = TestKey::es256();
        let t = key.sign_raw(&header_with(&key, "alg", json!("RS256")), &claims(NOW, "j").to_string());
        assert_eq!(check(&key, &t), Err(VerifyError::AlgMismatch));
        let t = key.sign(&claims(NOW, "j"));
        let eddsa_only = validator().allowed_algs([Algorithm::EdDSA, Algorithm::HS256]);
        assert_eq!(eddsa_only.validate(&t, &key.key_set(), NOW), Err(VerifyError::AlgMismatch));
    }

    #[test]
    fn key_referencing_headers_and_crit_are_refused() {
        let key = TestKey::es256();
        for (h, v) in [
            ("jku", json!("https://evil/jwks")),
            ("x5u", json!("https://evil/c.pem")),
            ("x5c", json!(["MIIB"])),
            ("jwk", json!({ "kty": "EC" })),
            ("crit", json!(["exp"])),
        ] {
            let t = key.sign_raw(&header_with(&key, h, v), &claims(NOW, "j").to_string());
            assert_eq!(check(&key, &t), Err(VerifyError::ForbiddenHeader), "{h}");
        }
    }

    #[test]
    fn typ_must_be_at_jwt() {
        let key = TestKey::es256();
        for typ in [json!("JWT"), json!("at+JWT2"), json!(null), json!(1)] {
            let t = key.sign_raw(&header_with(&key, "typ", typ.clone()), &claims(NOW, "j").to_string());
            let r = check(&key, &t);
            assert!(matches!(r, Err(VerifyError::WrongType | VerifyError::Malformed)), "{typ}: {r:?}");
        }
        let mut h = key.header();
        h.as_object_mut().unwrap().remove("typ");
        assert_eq!(check(&key, &key.sign_raw(&h, &claims(NOW, "j").to_string())), Err(VerifyError::WrongType));
    }

    #[test]
    fn kid_must_name_a_known_key() {
        let key = TestKey::es256();
        let t = key.sign_raw(&header_with(&key, "kid", json!("other")), &claims(NOW, "j").to_string());
        assert_eq!(check(&key, &t), Err(VerifyError::UnknownKid));
        let mut h = key.header();
        h.as_object_mut().unwrap().remove("kid");
        assert_eq!(check(&key, &key.sign_raw(&h, &claims(NOW, "j").to_string())), Err(VerifyError::UnknownKid));
    }

    #[test]
    fn signature_must_verify() {
        let key = TestKey::es256();
        let other = TestKey::es256();
        let t = key.sign(&claims(NOW, "j"));
        let (input, _) = t.rsplit_once('.').unwrap();
        let foreign = other.sign_raw(&key.header(), &claims(NOW, "j").to_string());
        let foreign_sig = foreign.rsplit_once('.').unwrap().1;
        assert_eq!(check(&key, &format!("{input}.{foreign_sig}")), Err(VerifyError::BadSignature));
        let mut payload = URL_SAFE_NO_PAD.decode(t.split('.').nth(1).unwrap()).unwrap();
        payload[10] ^= 1;
        let flipped = format!(
            "{}.{}.{}",
            t.split('.').next().unwrap(),
            URL_SAFE_NO_PAD.encode(payload),
            t.split('.').nth(2).unwrap()
        );
        assert_eq!(check(&key, &flipped), Err(VerifyError::BadSignature));
        assert_eq!(check(&key, &format!("{input}.AAAA")), Err(VerifyError::BadSignature));
    }

    #[test]
    fn payload_must_be_one_claims_object() {
        let key = TestKey::es256();
        for payload in ["[1]", "\"x\"", "null", "{}", "not json"] {
            assert_eq!(check(&key, &key.sign_raw(&key.header(), payload)), Err(VerifyError::BadClaims), "{payload}");
        }
        let dup = format!(
            r#"{{"iss":"auth-service","sub":"a","sub":"b","aud":"inventory","exp":{},"nbf":{NOW},"iat":{NOW},"jti":"j","client_id":"c"}}"#,
            NOW + 60
        );
        assert_eq!(check(&key, &key.sign_raw(&key.header(), &dup)), Err(VerifyError::BadClaims));
        for missing in ["exp", "jti", "iss", "aud"] {
            let mut c = claims(NOW, "j");
            c.as_object_mut().unwrap().remove(missing);
            assert_eq!(check(&key, &key.sign(&c)), Err(VerifyError::BadClaims), "{missing}");
        }
    }

    #[test]
    fn issuer_and_audience_must_match_exactly() {
        let key = TestKey::es256();
        assert_eq!(check(&key, &key.sign(&with("iss", json!("auth-service ")))), Err(VerifyError::WrongIssuer));
        assert_eq!(check(&key, &key.sign(&with("aud", json!("Inventory")))), Err(VerifyError::WrongAudience));
        assert_eq!(check(&key, &key.sign(&with("aud", json!([])))), Err(VerifyError::WrongAudience));
        let t = key.sign(&with("aud", json!("order")));
        assert!(validator().validate_for(&t, &key.key_set(), NOW, None).is_ok(), "audience skipped on request");
    }

    #[test]
    fn times_are_checked_with_the_leeway() {
        let key = TestKey::es256();
        let v = validator().leeway_secs(30);
        let keys = key.key_set();
        let exp = key.sign(&with("exp", json!(NOW - 30)));
        assert_eq!(v.validate(&exp, &keys, NOW), Err(VerifyError::Expired));
        assert!(v.validate(&key.sign(&with("exp", json!(NOW - 29))), &keys, NOW).is_ok());
        assert_eq!(v.validate(&key.sign(&with("nbf", json!(NOW + 31))), &keys, NOW), Err(VerifyError::NotYetValid));
        assert!(v.validate(&key.sign(&with("nbf", json!(NOW + 30))), &keys, NOW).is_ok());
        assert_eq!(v.validate(&key.sign(&with("iat", json!(NOW + 31))), &keys, NOW), Err(VerifyError::IssuedInFuture));
    }

    #[test]
    fn leeway_is_capped() {
        assert_eq!(validator().leeway_secs(10_000).leeway(), MAX_LEEWAY_SECS);
    }

    #[test]
    fn empty_jti_is_refused() {
        let key = TestKey::es256();
        assert_eq!(check(&key, &key.sign(&with("jti", json!("")))), Err(VerifyError::MissingJti));
    }

    #[test]
    fn every_error_has_a_distinct_reason_and_counter_slot() {
        let reasons: std::collections::HashSet<_> = VerifyError::ALL.iter().map(VerifyError::reason).collect();
        assert_eq!(reasons.len(), VerifyError::ALL.len());
        for (i, e) in VerifyError::ALL.iter().enumerate() {
            assert_eq!(e.index(), i);
        }
        assert!(VerifyError::RevocationUnavailable.is_unavailable());
        assert_eq!(tonic::Status::from(VerifyError::FeedStale).code(), tonic::Code::Unavailable);
        assert_eq!(tonic::Status::from(VerifyError::Expired).code(), tonic::Code::Unauthenticated);
    }
}
