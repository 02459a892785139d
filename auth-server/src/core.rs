//! What every flow shares: configuration, directory, keys, store, clock, and
//! minting of access tokens.

use std::sync::Arc;

use service_sdk::{Audience, Claims, Validator};

use crate::clock::SharedClock;
use crate::config::Config;
use crate::directory::{Directory, random_token};
use crate::error::AuthError;
use crate::grant::{Grant, Minted, PASSWORD_CLIENT_ID, RefreshIssued, refresh_digest};
use crate::keys::SigningKeys;
use crate::password::PasswordPool;
use crate::store::{IssuedToken, RefreshRecord, Store};

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
    /// Runs argon2id verifications on a few dedicated threads: each one holds
    /// about 19 MiB, so a burst of logins queues instead of spreading that
    /// memory over every blocking thread of the runtime.
    pub passwords: PasswordPool,
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
        Self { config, directory, keys, store, clock, validator, passwords: PasswordPool::for_this_machine() }
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

    /// Starts a new refresh family for a login session (one store write).
    pub async fn start_refresh_family(
        &self,
        sub: &str,
        sid: &str,
        audience: Vec<String>,
        scope: Vec<String>,
    ) -> Result<RefreshIssued, AuthError> {
        let token = random_token(32)?;
        let now = self.clock.now_unix();
        let record = RefreshRecord {
            family: random_token(16)?,
            sid: sid.to_owned(),
            sub: sub.to_owned(),
            client_id: PASSWORD_CLIENT_ID.into(),
            audience,
            scope,
            expires_at: now + self.config.tokens.refresh_ttl_secs,
        };
        self.store.put_refresh(&refresh_digest(&token), &record, now).await?;
        Ok(RefreshIssued { token })
    }

    /// Fully verifies a token of this issuer: signature, pinned alg, `typ`,
    /// issuer, times, then the deny list (`jti` and `sid`). `audience`, when
    /// set, must be in `aud`.
    pub async fn verify_presented(&self, token: &str, audience: Option<&str>) -> Result<Claims, AuthError> {
        let now = self.clock.now_unix();
        let keys = self.keys.public_keys();
        let claims =
            self.validator.validate_for(token, &keys.keys, now, audience).map_err(AuthError::token_rejected)?;
        if self.store.is_revoked(&claims.jti, claims.sid.as_deref(), now).await? {
            return Err(AuthError::Unauthenticated("token revoked"));
        }
        Ok(claims)
    }
}
