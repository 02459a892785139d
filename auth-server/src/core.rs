//! What every flow shares: configuration, directory, keys, store, clock, and
//! minting of access tokens.

use std::sync::Arc;

use service_sdk::{Actor, Audience, Claims, Validator, VerifyError};

use crate::clock::SharedClock;
use crate::config::Config;
use crate::directory::{Directory, random_token};
use crate::error::AuthError;
use crate::keys::SigningKeys;
use crate::store::{IssuedToken, Store};

/// Largest accepted string field (bytes).
pub const MAX_FIELD_BYTES: usize = 8 * 1024;
/// Largest accepted list (audiences, scopes).
pub const MAX_LIST_LEN: usize = 64;

/// The state the flows run against.
pub struct AuthCore {
    /// Validated configuration.
    pub config: Config,
    /// Users and service accounts.
    pub directory: Arc<Directory>,
    /// Signing keys.
    pub keys: Arc<dyn SigningKeys>,
    /// State store.
    pub store: Arc<dyn Store>,
    /// Time.
    pub clock: SharedClock,
    /// Validator for tokens presented to the auth service itself (subject
    /// tokens, revocation proofs). Audience is checked per call.
    pub validator: Validator,
}

/// What a new access token says, before the server adds times and `jti`.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Subject.
    pub sub: String,
    /// Audiences.
    pub aud: Vec<String>,
    /// Lifetime in seconds.
    pub ttl: u64,
    /// Login session.
    pub sid: Option<String>,
    /// Client the token is issued to.
    pub client_id: String,
    /// Role.
    pub role: Option<String>,
    /// Permissions.
    pub perms: Vec<String>,
    /// Delegation chain.
    pub act: Option<Actor>,
}

/// A minted access token.
#[derive(Debug, Clone)]
pub struct Minted {
    /// The compact JWS.
    pub token: String,
    /// Its claims.
    pub claims: Claims,
}

impl AuthCore {
    /// Builds the core; the validator follows `config.issuer`.
    pub fn new(
        config: Config,
        directory: Arc<Directory>,
        keys: Arc<dyn SigningKeys>,
        store: Arc<dyn Store>,
        clock: SharedClock,
    ) -> Self {
        let validator = Validator::new(config.issuer.clone(), String::new());
        Self { config, directory, keys, store, clock, validator }
    }

    /// Signs a token for `grant` and records its `jti` (one store write).
    pub async fn mint(&self, grant: Grant) -> Result<Minted, AuthError> {
        let now = self.clock.now_unix();
        let claims = Claims {
            iss: self.config.issuer.clone(),
            sub: grant.sub,
            aud: Audience::from_list(grant.aud),
            exp: now + grant.ttl,
            nbf: now,
            iat: now,
            jti: random_token(16)?,
            sid: grant.sid,
            client_id: grant.client_id,
            role: grant.role,
            perms: grant.perms,
            act: grant.act,
            cnf: None,
        };
        let token = self.keys.sign(&claims).await?;
        let issued = IssuedToken { sub: claims.sub.clone(), sid: claims.sid.clone(), exp: claims.exp };
        self.store.record_issued(&claims.jti, &issued, now).await?;
        Ok(Minted { token, claims })
    }

    /// Fully verifies a token of this issuer: signature, pinned alg, `typ`,
    /// issuer, times, then the deny list (`jti` and `sid`). `audience`, when
    /// set, must be in `aud`.
    pub async fn verify_presented(&self, token: &str, audience: Option<&str>) -> Result<Claims, AuthError> {
        let now = self.clock.now_unix();
        let keys = self.keys.public_keys();
        let claims = self.validator.validate_for(token, &keys.keys, now, audience).map_err(reject)?;
        if self.store.is_revoked(&claims.jti, claims.sid.as_deref(), now).await? {
            return Err(AuthError::Unauthenticated("token revoked"));
        }
        Ok(claims)
    }
}

/// Maps a validation failure to a fixed reason.
pub(crate) fn reject(e: VerifyError) -> AuthError {
    AuthError::Unauthenticated(match e {
        VerifyError::Expired => "token expired",
        VerifyError::NotYetValid | VerifyError::IssuedInFuture => "token not yet valid",
        VerifyError::WrongIssuer => "token from another issuer",
        VerifyError::WrongAudience => "token not addressed to the caller",
        VerifyError::TooLarge => "token too large",
        VerifyError::Revoked => "token revoked",
        _ => "invalid token",
    })
}

/// Checks a string field's size.
pub(crate) fn check_field(value: &str, what: &'static str) -> Result<(), AuthError> {
    if value.len() > MAX_FIELD_BYTES { Err(AuthError::InvalidArgument(what)) } else { Ok(()) }
}

/// Checks a list's length and each item's size.
pub(crate) fn check_list(values: &[String], what: &'static str) -> Result<(), AuthError> {
    if values.len() > MAX_LIST_LEN || values.iter().any(|v| v.is_empty() || v.len() > 256) {
        Err(AuthError::InvalidArgument(what))
    } else {
        Ok(())
    }
}
