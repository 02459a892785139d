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
    /// Runs argon2id verifications on a few dedicated threads: each one holds
    /// about 19 MiB, so a burst of logins queues instead of spreading that
    /// memory over every blocking thread of the runtime.
    pub passwords: PasswordPool,
}

type PasswordJob = Box<dyn FnOnce() + Send>;

/// A small fixed pool of threads for password hashing.
pub struct PasswordPool {
    jobs: std::sync::Mutex<std::sync::mpsc::Sender<PasswordJob>>,
}

impl PasswordPool {
    /// Starts `threads` workers.
    pub fn new(threads: usize) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<PasswordJob>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            let spawned = std::thread::Builder::new().name(format!("password-{i}")).spawn(move || {
                loop {
                    let job = match rx.lock() {
                        Ok(guard) => guard.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start a password thread");
            }
        }
        Self { jobs: std::sync::Mutex::new(tx) }
    }

    /// Runs `f` on the pool and waits for its result.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, AuthError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: PasswordJob = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .lock()
            .map_err(|_| AuthError::Internal("password pool poisoned"))?
            .send(job)
            .map_err(|_| AuthError::Internal("password pool stopped"))?;
        rx.await.map_err(|_| AuthError::Internal("password check failed"))
    }
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
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
        Self { config, directory, keys, store, clock, validator, passwords: PasswordPool::new(threads) }
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
