//! The server side: verifying incoming access tokens.
//!
//! - [`Validator`]: the pure checks of one token against a [`KeySet`] and a
//!   clock reading (no I/O).
//! - [`Verifier`]: keys, validator, revocation and a verified-token cache
//!   tied together: a [`JwksSource`] (`GetJwks` over mTLS, or an HTTP(S)
//!   JWKS URL) loaded at start with retry, refreshed in the background and
//!   refetched (rate-limited) on an unknown `kid`; a [`RevocationCheck`]
//!   ([`RevocationFeed`] over `WatchRevocations` by default, or with the
//!   `redis` feature a per-request Redis lookup); an injected
//!   [`Clock`](crate::Clock).
//! - [`RequireAuthLayer`] / [`RequireAuth`]: the tower middleware for tonic
//!   servers and axum routers, generic over an [`AuthorizeRequest`] (the
//!   shape of tower-http's `AsyncAuthorizeRequest`). The default authorizer
//!   is the [`Verifier`], which puts the verified [`Claims`](crate::Claims)
//!   and the raw [`BearerToken`] into request extensions.
//! - [`VerifyObserver`]: where a verifier reports every outcome (each
//!   verification, key refreshes, the revocation feed's state), for
//!   metrics and logs.

mod authorize;
mod bearer;
mod cache;
mod compact;
mod jwks;
mod keys;
mod layer;
mod observe;
#[cfg(feature = "redis")]
mod redis;
mod revocation;
#[cfg(test)]
mod test_keys;
mod validator;
mod verifier;

pub use authorize::{AuthorizeRequest, BearerToken, PeerCertificate, VerifyRequest};
pub use bearer::parse_bearer;
pub use jwks::{JwksError, JwksOptions, JwksSource};
pub use keys::{KeySet, VerifyKey};
pub use layer::{RequireAuth, RequireAuthLayer, ResponseFuture, TraceTrust};
pub use observe::{CacheUse, FeedHealth, FeedStats, JwksTrigger, VerifierStats, VerifyEvent, VerifyObserver};
#[cfg(feature = "redis")]
pub use redis::{RedisRevocation, RedisSetupError};
pub use revocation::{
    FeedOptions, FeedOptionsError, LookupFuture, RevocationCheck, RevocationFeed, RevocationLookup, RevokedId,
    RevokedKind, StalePolicy,
};
pub use validator::{DEFAULT_LEEWAY_SECS, DEFAULT_MAX_TOKEN_BYTES, MAX_LEEWAY_SECS, Validator};
pub use verifier::{BuildError, DEFAULT_CACHE_CAPACITY, Verifier, VerifierBuilder};

/// Why a token was refused. Messages are fixed and never contain token
/// content, so they are safe to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// No `authorization: Bearer` credential on the request.
    #[error("missing bearer token")]
    Missing,
    /// The token is larger than the configured limit.
    #[error("token too large")]
    TooLarge,
    /// Not three base64url parts with a JSON header.
    #[error("malformed token")]
    Malformed,
    /// `jku`, `x5u`, `x5c`, `jwk` or `crit` header present.
    #[error("forbidden header parameter")]
    ForbiddenHeader,
    /// `typ` is not `at+jwt`.
    #[error("wrong token type")]
    WrongType,
    /// `alg` is `none`, symmetric or unknown.
    #[error("forbidden algorithm")]
    ForbiddenAlg,
    /// The `kid` is missing or not in the key set.
    #[error("unknown key id")]
    UnknownKid,
    /// The header `alg` differs from the key's pinned `alg`, or is not allowed.
    #[error("algorithm does not match key")]
    AlgMismatch,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// The payload is not a valid claims object.
    #[error("invalid claims")]
    BadClaims,
    /// `iss` is not the expected issuer.
    #[error("wrong issuer")]
    WrongIssuer,
    /// `aud` does not name this service.
    #[error("wrong audience")]
    WrongAudience,
    /// `exp` has passed (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` lies in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// `iat` lies in the future (beyond the leeway).
    #[error("token issued in the future")]
    IssuedInFuture,
    /// `jti` is missing or empty.
    #[error("missing jti")]
    MissingJti,
    /// The token's `jti` or `sid` has been revoked.
    #[error("token revoked")]
    Revoked,
    /// `cnf.x5t#S256` does not match the peer certificate.
    #[error("certificate binding mismatch")]
    CnfMismatch,
    /// The JWK Set could not be parsed.
    #[error("bad JWK set")]
    BadJwks,
    /// No keys are known yet (the auth service was never reached).
    #[error("no verification keys available")]
    NoKeys,
    /// The revocation feed has been silent for longer than allowed (its
    /// stale bound, plus any serve-stale window), or has had no snapshot
    /// yet.
    #[error("revocation feed stale")]
    FeedStale,
    /// The revocation store (redis mode) cannot be asked.
    #[error("revocation check unavailable")]
    RevocationUnavailable,
}

impl VerifyError {
    /// Whether the failure is ours (keys or feed unavailable) rather than the
    /// token's: such requests get `Unavailable`, not `Unauthenticated`.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            VerifyError::NoKeys | VerifyError::FeedStale | VerifyError::BadJwks | VerifyError::RevocationUnavailable
        )
    }

    /// A short stable label, for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::Missing => "missing",
            VerifyError::TooLarge => "too_large",
            VerifyError::Malformed => "malformed",
            VerifyError::ForbiddenHeader => "forbidden_header",
            VerifyError::WrongType => "wrong_typ",
            VerifyError::ForbiddenAlg => "forbidden_alg",
            VerifyError::UnknownKid => "unknown_kid",
            VerifyError::AlgMismatch => "alg_mismatch",
            VerifyError::BadSignature => "bad_signature",
            VerifyError::BadClaims => "bad_claims",
            VerifyError::WrongIssuer => "wrong_iss",
            VerifyError::WrongAudience => "wrong_aud",
            VerifyError::Expired => "expired",
            VerifyError::NotYetValid => "not_yet_valid",
            VerifyError::IssuedInFuture => "iat_in_future",
            VerifyError::MissingJti => "missing_jti",
            VerifyError::Revoked => "revoked",
            VerifyError::CnfMismatch => "cnf_mismatch",
            VerifyError::BadJwks => "bad_jwks",
            VerifyError::NoKeys => "no_keys",
            VerifyError::FeedStale => "feed_stale",
            VerifyError::RevocationUnavailable => "revocation_unavailable",
        }
    }

    /// Every variant, in declaration order (for per-reason counters).
    pub(crate) const ALL: [VerifyError; 22] = [
        VerifyError::Missing,
        VerifyError::TooLarge,
        VerifyError::Malformed,
        VerifyError::ForbiddenHeader,
        VerifyError::WrongType,
        VerifyError::ForbiddenAlg,
        VerifyError::UnknownKid,
        VerifyError::AlgMismatch,
        VerifyError::BadSignature,
        VerifyError::BadClaims,
        VerifyError::WrongIssuer,
        VerifyError::WrongAudience,
        VerifyError::Expired,
        VerifyError::NotYetValid,
        VerifyError::IssuedInFuture,
        VerifyError::MissingJti,
        VerifyError::Revoked,
        VerifyError::CnfMismatch,
        VerifyError::BadJwks,
        VerifyError::NoKeys,
        VerifyError::FeedStale,
        VerifyError::RevocationUnavailable,
    ];

    /// Position in [`VerifyError::ALL`] (the declaration order).
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// The one mapping of a refused token to a gRPC status: `Unavailable` when
/// the verifier itself cannot decide (no keys, stale feed), otherwise
/// `Unauthenticated`. The message is the fixed text of the error, which
/// never contains token content.
impl From<VerifyError> for tonic::Status {
    fn from(e: VerifyError) -> Self {
        if e.is_unavailable() {
            tonic::Status::unavailable(e.to_string())
        } else {
            tonic::Status::unauthenticated(e.to_string())
        }
    }
}
