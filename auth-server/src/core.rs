//! What every flow shares: the reloadable [`Policy`] (token settings,
//! directory, signing keys), the store, the clock, and minting of access
//! tokens.

use std::sync::Arc;

use arc_swap::ArcSwap;
use service_sdk::{Audience, Claims, Confirmation, Validator};

use crate::clock::SharedClock;
use crate::config::{Config, ConfigError, TokensConfig, WatchConfig};
use crate::directory::{Directory, DirectoryFiles, random_token};
use crate::error::AuthError;
use crate::grant::{Grant, Minted, PASSWORD_CLIENT_ID, RefreshIssued, refresh_digest, refresh_token};
use crate::keys::{KeyError, SigningKeys};
use crate::observe::{Events, NoEvents};
use crate::password::{PasswordPool, PoolConfig};
use crate::readiness::Readiness;
use crate::revocations::Revocations;
use crate::store::{IssuedToken, RefreshRecord, Store};
use crate::throttle::LoginThrottle;

/// What a reload may change, swapped whole: a request loads it once
/// ([`AuthCore::policy`]) and sees one consistent value throughout.
pub struct Policy {
    /// Token lifetimes and limits.
    pub tokens: TokensConfig,
    /// Users and service accounts.
    pub directory: Arc<Directory>,
    /// Signing keys.
    pub keys: Arc<dyn SigningKeys>,
    /// How long HTTP clients may cache the JWKS (`keys.jwks_max_age_secs`).
    pub jwks_max_age_secs: u64,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("tokens", &self.tokens)
            .field("signing_kid", &self.keys.signing_kid())
            .finish_non_exhaustive()
    }
}

/// Why a [`Policy`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The users or accounts file is unusable.
    #[error(transparent)]
    Directory(#[from] ConfigError),
    /// The keys could not be opened.
    #[error(transparent)]
    Keys(#[from] KeyError),
}

impl Policy {
    /// Reads the users and accounts files named by `config` and takes `keys`
    /// as the signing keys.
    pub fn load(config: &Config, keys: Arc<dyn SigningKeys>) -> Result<Self, PolicyError> {
        let files = DirectoryFiles::read(&config.users_file, &config.accounts_file)?;
        Self::build(config, keys, &files)
    }

    /// Like [`Policy::load`], from the files' contents already read.
    pub fn build(config: &Config, keys: Arc<dyn SigningKeys>, files: &DirectoryFiles) -> Result<Self, PolicyError> {
        let directory = checked_directory(files, &config.tokens)?;
        Ok(Self {
            tokens: config.tokens.clone(),
            directory: Arc::new(directory),
            keys,
            jwks_max_age_secs: config.jwks_max_age_secs,
        })
    }

    /// This policy with the users and accounts of `files` instead (the
    /// files changed; the config file did not).
    pub fn with_directory(&self, files: &DirectoryFiles) -> Result<Self, PolicyError> {
        Ok(Self {
            tokens: self.tokens.clone(),
            directory: Arc::new(checked_directory(files, &self.tokens)?),
            keys: Arc::clone(&self.keys),
            jwks_max_age_secs: self.jwks_max_age_secs,
        })
    }

    /// What the registry records of a token with `claims`, if
    /// `tokens.record_issued` records it at all.
    pub fn recorded(&self, claims: &Claims) -> Option<IssuedToken> {
        self.tokens.record_issued.records(claims.sid.as_deref()).then(|| issued_record(claims))
    }

    /// The `kid`s in the published key set, sorted.
    pub fn published_kids(&self) -> Vec<String> {
        let mut kids: Vec<String> = self.keys.public_keys().keys.kids().map(str::to_owned).collect();
        kids.sort_unstable();
        kids
    }
}

/// The users and accounts of `files`, checked against `tokens`.
fn checked_directory(files: &DirectoryFiles, tokens: &TokensConfig) -> Result<Directory, ConfigError> {
    let directory = files.parse()?;
    if directory.account(&tokens.self_audience).is_some() {
        // Tokens for the auth service may end sessions: no service may
        // receive them as its own.
        return Err(ConfigError {
            key: "accounts_file".into(),
            problem: format!(
                "client_id {:?} is the auth service's own audience (tokens.self_audience)",
                tokens.self_audience
            ),
        });
    }
    Ok(directory)
}

/// Signs a token for `grant` with `policy`'s keys, issued at `now` by
/// `issuer`, with a `jti` chosen beforehand, and records nothing. Refresh
/// commits the rotation, which records the `jti`, before it signs, and
/// signs in a task of its own (which the caller's cancellation cannot
/// interrupt): hence a function that needs no [`AuthCore`].
pub async fn sign_as(issuer: &str, policy: &Policy, grant: Grant, now: u64, jti: String) -> Result<Minted, AuthError> {
    let claims = Claims {
        iss: issuer.to_owned(),
        sub: grant.sub,
        aud: Audience::from_list(grant.aud),
        exp: now + grant.ttl,
        nbf: now,
        iat: now,
        jti,
        sid: grant.sid,
        client_id: grant.client_id,
        role: grant.role,
        perms: grant.perms,
        act: grant.act,
        cnf: grant.cnf.map(|x5t_s256| Confirmation { x5t_s256 }),
    };
    let token = policy.keys.sign(&claims).await?;
    Ok(Minted { token, claims })
}

/// The state the flows run against.
pub struct AuthCore {
    /// The `iss` of every token (restart-only).
    pub issuer: String,
    /// WatchRevocations settings (restart-only).
    pub watch: WatchConfig,
    /// The reloadable part; see [`AuthCore::policy`].
    policy: ArcSwap<Policy>,
    /// State store.
    pub store: Arc<dyn Store>,
    /// The replica's own deny set, fed by the store's revocation feed:
    /// presented tokens are checked against it, with no store round trip.
    pub revocations: Revocations,
    /// Time.
    pub clock: SharedClock,
    /// Validator for tokens presented to the auth service itself (subject
    /// tokens, revocation proofs). Audience is checked per call.
    pub validator: Validator,
    /// Runs argon2id verifications on a few dedicated threads behind a
    /// bounded queue (`limits.password_*`): each one holds about 19 MiB, so
    /// a burst of logins queues, and a flood is refused, instead of spreading
    /// that memory over every blocking thread of the runtime.
    pub passwords: PasswordPool,
    /// Back-off of failed password logins per username (`limits.login_*`).
    pub login_throttle: LoginThrottle,
    /// Where handlers (and a flow, when only it knows) report what they
    /// decided: the audit trail and the metrics (see [`crate::observe`]).
    pub events: Arc<dyn Events>,
    /// Conditions besides the store that make the replica not ready (an
    /// expired server certificate): `/readyz` and gRPC health follow them.
    pub readiness: Readiness,
}

impl AuthCore {
    /// Builds the core from the restart-only settings of `config` and a
    /// first `policy`; the validator follows `config.issuer`.
    /// `revocations` follows `store`'s feed.
    pub fn new(
        config: &Config,
        policy: Policy,
        store: Arc<dyn Store>,
        revocations: Revocations,
        clock: SharedClock,
    ) -> Self {
        let validator = Validator::new(config.issuer.clone(), String::new());
        Self {
            issuer: config.issuer.clone(),
            watch: config.watch.clone(),
            policy: ArcSwap::from_pointee(policy),
            store,
            revocations,
            clock,
            validator,
            passwords: PasswordPool::new(PoolConfig {
                threads: match config.limits.password_threads {
                    0 => PoolConfig::threads_for_this_machine(),
                    n => n,
                },
                queue: config.limits.password_queue,
                linger: PoolConfig::LINGER,
                nice: config.limits.password_nice,
            }),
            login_throttle: LoginThrottle::new((&config.limits).into()),
            events: Arc::new(NoEvents),
            readiness: Readiness::new(),
        }
    }

    /// Reports events to `events` instead of dropping them.
    pub fn with_events(mut self, events: Arc<dyn Events>) -> Self {
        self.events = events;
        self
    }

    /// The current policy. Load it once per request and use that value
    /// throughout, so one request never mixes two policies.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Replaces the policy atomically; returns the previous one. Requests
    /// already running finish with the policy they loaded.
    pub fn swap_policy(&self, policy: Policy) -> Arc<Policy> {
        self.policy.swap(Arc::new(policy))
    }

    /// Signs a token for `grant` with `policy`'s keys, issued at `now`. It
    /// is recorded in the store's registry (one store write) only when
    /// `tokens.record_issued` asks for it ([`Policy::recorded`]); by
    /// default issuing touches no store. A flow reads the clock once and
    /// passes that `now` to every step, so the token's `exp` is exactly the
    /// lifetime the flow decided on (never past a subject token's `exp`).
    pub async fn mint(&self, policy: &Policy, grant: Grant, now: u64) -> Result<Minted, AuthError> {
        let minted = self.sign(policy, grant, now).await?;
        if let Some(record) = policy.recorded(&minted.claims) {
            self.store.record_issued(&minted.claims.jti, &record, now).await?;
        }
        Ok(minted)
    }

    /// Signs a token for `grant`, issued at `now`, and records nothing: for
    /// a flow that records it (when [`Policy::recorded`] says so) in the
    /// same store step as its other effects (refresh). A token whose
    /// recording failed is never handed out.
    pub async fn sign(&self, policy: &Policy, grant: Grant, now: u64) -> Result<Minted, AuthError> {
        self.sign_as(policy, grant, now, random_token(16)?).await
    }

    /// [`AuthCore::sign`] with a `jti` chosen beforehand (see [`sign_as`]).
    pub async fn sign_as(&self, policy: &Policy, grant: Grant, now: u64, jti: String) -> Result<Minted, AuthError> {
        sign_as(&self.issuer, policy, grant, now, jti).await
    }

    /// Starts a new refresh family for a login session (one store write).
    pub async fn start_refresh_family(
        &self,
        policy: &Policy,
        sub: &str,
        sid: &str,
        audience: Vec<String>,
        scope: Vec<String>,
    ) -> Result<RefreshIssued, AuthError> {
        let family = random_token(16)?;
        let token = refresh_token(&family, &random_token(32)?);
        let now = self.clock.now_unix();
        let record = RefreshRecord {
            family,
            sid: sid.to_owned(),
            sub: sub.to_owned(),
            client_id: PASSWORD_CLIENT_ID.into(),
            audience,
            scope,
            expires_at: now + policy.tokens.refresh_ttl_secs,
        };
        self.store.put_refresh(&refresh_digest(&token), &record, now).await?;
        Ok(RefreshIssued { token })
    }

    /// Fully verifies a token of this issuer: signature, pinned alg, `typ`,
    /// issuer, times, then the deny list (`jti` and `sid`), in the
    /// replica's own deny set ([`Revocations`]): no store round trip, and
    /// `UNAVAILABLE` while that set cannot be trusted. `audience`, when
    /// set, must be in `aud`. Keys come from `policy`.
    pub async fn verify_presented(
        &self,
        policy: &Policy,
        token: &str,
        audience: Option<&str>,
    ) -> Result<Claims, AuthError> {
        self.verify_presented_at(policy, token, audience, self.clock.now_unix()).await
    }

    /// [`AuthCore::verify_presented`] at time `now`.
    pub async fn verify_presented_at(
        &self,
        policy: &Policy,
        token: &str,
        audience: Option<&str>,
        now: u64,
    ) -> Result<Claims, AuthError> {
        let keys = policy.keys.public_keys();
        let claims =
            self.validator.validate_for(token, &keys.keys, now, audience).map_err(AuthError::token_rejected)?;
        self.revocations.check(&claims.jti, claims.sid.as_deref())?;
        Ok(claims)
    }
}

/// What the store records of an issued access token.
pub fn issued_record(claims: &Claims) -> IssuedToken {
    IssuedToken { sub: claims.sub.clone(), sid: claims.sid.clone(), exp: claims.exp }
}
