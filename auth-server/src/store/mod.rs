//! The state-store port: the deny list, revoked sessions, refresh-token
//! families, and the optional registry of issued `jti`s (written only when
//! `tokens.record_issued` asks for it: no token needs a record to be
//! revocable).
//!
//! Every method is one atomic step in the store, so an implementation on
//! Redis can run each as a single command, transaction or Lua script:
//! - [`Store::commit_refresh`] spends a refresh token, stores its successor
//!   and records the new access token, or detects reuse and revokes the
//!   family, in one step, and returns the spent token's record: the flow
//!   decides and signs the new access token from it afterwards, and should
//!   signing fail, [`Store::undo_refresh`] puts a rotated token back (a
//!   retried one stays spent);
//! - [`Store::revoke_refresh`] revokes a refresh token's family or session
//!   by the token itself (proof of possession) in one step;
//! - a revocation is acknowledged (the future resolves `Ok`) only once it is
//!   durable in the store, and is then published to [`Store::subscribe`]rs.
//!   Whether those events can be trusted right now is the feed's state
//!   ([`Store::feed_state`]): not live while revocations made elsewhere may
//!   not arrive, and a new epoch whenever some may have been lost.
//!
//! Times are Unix seconds; every entry carries the time after which it may be
//! forgotten, so the store never grows past the live tokens.
//!
//! [`conformance`] checks all of this against any implementation: the
//! in-memory store and the Redis store both pass it.

pub mod conformance;
mod memory;
mod redis;

pub use memory::MemoryStore;
pub use redis::RedisStore;

use std::sync::Arc;

/// Connects the Redis store.
pub async fn open_redis(config: &crate::config::RedisConfig) -> Result<Arc<dyn Store>, StoreError> {
    Ok(Arc::new(RedisStore::connect(config).await?))
}

use async_trait::async_trait;
use tokio::sync::{broadcast, watch};

/// The state of a store's revocation feed ([`Store::subscribe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedState {
    /// Whether revocations made anywhere (by any replica) reach this
    /// store's subscribers now. A shared store whose subscription is cut
    /// off, or unconfirmed for too long, is not live.
    pub live: bool,
    /// Moves whenever events may have been missed (a new subscription after
    /// a gap, a lag): what was built from earlier events must be re-read
    /// from [`Store::revoked_snapshot`].
    pub epoch: u64,
}

/// What a revocation applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RevocationKind {
    /// An access token, by `jti`.
    Jti,
    /// A login session, by `sid`.
    Sid,
    /// A refresh-token family.
    Family,
}

/// One revocation, as stored and as published.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Revocation {
    /// What `id` names.
    pub kind: RevocationKind,
    /// The jti, sid or family id.
    pub id: String,
    /// When the entry may be forgotten (Unix seconds).
    pub expires_at: u64,
}

/// What the store remembers of an issued access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The token's `sub`.
    pub sub: String,
    /// The token's `sid`, if any.
    pub sid: Option<String>,
    /// The token's `exp`.
    pub exp: u64,
}

/// A refresh token's server-side record. The token itself is never stored,
/// only its SHA-256 digest (the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshRecord {
    /// The rotation family: every successor of one login shares it.
    pub family: String,
    /// The login session.
    pub sid: String,
    /// The user.
    pub sub: String,
    /// The login client (`client_id` claim).
    pub client_id: String,
    /// Audiences of the access tokens it refreshes.
    pub audience: Vec<String>,
    /// Scopes granted at login; a refresh never widens them.
    pub scope: Vec<String>,
    /// Expiry of this refresh token (Unix seconds).
    pub expires_at: u64,
}

/// The outcome of presenting a refresh token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumeOutcome {
    /// The token was live and is now spent; its successor is stored.
    Rotated(RefreshRecord),
    /// The token was spent moments ago (within the reuse grace window) and
    /// its successor never used: a retry after a lost reply. The successor
    /// stored then is deleted and the new one replaces it.
    Retried(RefreshRecord),
    /// The token was already spent: its family is now revoked. The record
    /// is the presented token's (the audit trail names its family and
    /// session).
    Reused(RefreshRecord),
    /// Unknown, expired, or its family or session is revoked.
    Invalid,
}

impl ConsumeOutcome {
    /// What the commit wrote, for [`Store::undo_refresh`]: `None` when it
    /// wrote no successor (a reuse, an invalid token).
    pub fn committed(&self) -> Option<Committed> {
        match self {
            Self::Rotated(_) => Some(Committed::Rotated),
            Self::Retried(_) => Some(Committed::Retried),
            Self::Reused(_) | Self::Invalid => None,
        }
    }
}

/// Which commit [`Store::undo_refresh`] undoes: what
/// [`Store::commit_refresh`] answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// [`ConsumeOutcome::Rotated`]: the token was live until this commit,
    /// which the undo reverses.
    Rotated,
    /// [`ConsumeOutcome::Retried`]: the token was spent before this commit
    /// and stays spent from then (its reuse grace window keeps running from
    /// its first spend); the undo deletes only the access token's registry
    /// entry, and the retry's successor stays stored, unspent, for another
    /// retry within that window.
    Retried,
}

/// One refresh rotation, committed in one atomic store step: spend
/// `digest`, store `next_digest` as its successor (same family, session and
/// grant, expiring at `next_expires_at`) and, when `issued_exp` is set,
/// record the new access token `jti` (with the spent record's `sub` and
/// `sid`). Nothing is written unless all of it is. The successor and the
/// `jti` are random, chosen before the commit; the access token is signed
/// after it, from the record it returns.
#[derive(Debug, Clone, Copy)]
pub struct RefreshCommit<'a> {
    /// Digest of the presented refresh token.
    pub digest: &'a str,
    /// Digest of its successor.
    pub next_digest: &'a str,
    /// Expiry of the successor (Unix seconds).
    pub next_expires_at: u64,
    /// The new access token's `jti`.
    pub jti: &'a str,
    /// The new access token's `exp` when the registry records it
    /// (`tokens.record_issued`): the store records
    /// `IssuedToken { sub, sid, exp }` with the `sub` and `sid` of the
    /// record it spends. `None`: nothing is recorded.
    pub issued_exp: Option<u64>,
    /// How long after a token was spent a second presentation counts as a
    /// retry ([`ConsumeOutcome::Retried`]) rather than a reuse; 0 = never.
    pub reuse_grace_secs: u64,
}

/// A revocation by refresh token (proof of possession), made in one
/// atomic store step with the lookup of the token's record: the family of
/// the token `digest` names, or its login session (logout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshRevoke<'a> {
    /// Digest of the presented refresh token.
    pub digest: &'a str,
    /// [`RevocationKind::Family`] or [`RevocationKind::Sid`] (the
    /// session); a `Jti` is refused as [`StoreError::Corrupt`].
    pub kind: RevocationKind,
    /// Until when the entry lives at least; see [`RefreshRevoke::deny_until`].
    pub until: u64,
}

impl RefreshRevoke<'_> {
    /// Until when the entry lives, given the presented token's record: a
    /// family at least as long as the presented token itself (no member
    /// issued before now outlives the later of the two), a session exactly
    /// `until`. Every store computes it this way (the Redis script mirrors
    /// it); the flow's policy chooses `until`.
    pub fn deny_until(&self, record: &RefreshRecord) -> u64 {
        match self.kind {
            RevocationKind::Family => self.until.max(record.expires_at),
            RevocationKind::Sid | RevocationKind::Jti => self.until,
        }
    }

    /// The revocation this makes of the presented token's `record`.
    pub fn revocation(&self, record: &RefreshRecord) -> Revocation {
        let id = match self.kind {
            RevocationKind::Sid => record.sid.clone(),
            RevocationKind::Family | RevocationKind::Jti => record.family.clone(),
        };
        Revocation { kind: self.kind, id, expires_at: self.deny_until(record) }
    }
}

/// How many entries the deny list holds, by kind (for metrics). A store
/// counts what it keeps, so an entry that expired moments ago may still be
/// counted until the store prunes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DenyListSize {
    /// Revoked access tokens (`jti`).
    pub jti: u64,
    /// Revoked login sessions (`sid`).
    pub sid: u64,
    /// Revoked refresh-token families.
    pub family: u64,
}

/// A store failure. The message names no key material.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached or timed out.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend answered something the store cannot interpret.
    #[error("store data corrupt: {0}")]
    Corrupt(String),
    /// The write reached the primary but fewer replicas than required
    /// acknowledged it in time (`redis.min_replicas_acked`). It may well
    /// exist, and may even have been published, but it is not durable
    /// against the primary's loss, so it is not acknowledged: the caller
    /// answers `UNAVAILABLE` and the client retries.
    #[error("store write not durable: {acked} of {wanted} replicas acknowledged it in time")]
    NotDurable {
        /// Replicas that acknowledged the write within the timeout.
        acked: u64,
        /// Replicas required (`redis.min_replicas_acked`).
        wanted: u32,
    },
    /// Redis holds another key layout than this server's `redis.layout`
    /// gives: its layout marker names another layout (written by a replica
    /// configured otherwise, or by another version). Reading and writing
    /// the other layout's keys under this one would miss them, so the
    /// store refuses to start (and, found later, refuses every call).
    #[error(
        "redis key layout mismatch: redis.layout gives {configured:?} but the layout marker {marker} at this Redis \
         holds {found:?}; set redis.layout to the layout every other replica and verifier uses (or use a fresh \
         Redis or redis.prefix: see docs/REDIS.md)"
    )]
    LayoutMismatch {
        /// The layout `redis.layout` gives (with `auto`, for this URL):
        /// `single` or `sharded`.
        configured: &'static str,
        /// The marker's value (`single|1`, `sharded|1`, or one this
        /// version does not know), shortened to 64 characters.
        found: String,
        /// The marker key (`{P}:layout`).
        marker: String,
    },
    /// Redis holds no layout marker, but keys of another layout than this
    /// server's `redis.layout` gives: revocations written before markers
    /// existed, by replicas configured otherwise. Claiming the marker for
    /// this layout would hide them, so the store refuses to start (and,
    /// found later, refuses every call) and leaves the marker absent.
    #[error(
        "redis key layout mismatch: redis.layout gives {configured:?} but this Redis has no layout marker \
         ({marker}) and holds keys of the {found:?} layout ({key}); set redis.layout to {found:?}, the layout the \
         existing revocations follow (or use a fresh Redis or redis.prefix: see docs/REDIS.md)"
    )]
    UnmarkedLayout {
        /// The layout `redis.layout` gives: `single` or `sharded`.
        configured: &'static str,
        /// The layout whose keys were found.
        found: &'static str,
        /// The key found.
        key: String,
        /// The marker key (`{P}:layout`).
        marker: String,
    },
}

/// The state-store port.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records an issued access token (its owner, session and expiry).
    async fn record_issued(&self, jti: &str, token: &IssuedToken, now: u64) -> Result<(), StoreError>;

    /// Looks up an issued access token by `jti`.
    async fn issued(&self, jti: &str, now: u64) -> Result<Option<IssuedToken>, StoreError>;

    /// Whether the `jti`, or the session `sid`, is revoked.
    async fn is_revoked(&self, jti: &str, sid: Option<&str>, now: u64) -> Result<bool, StoreError>;

    /// Makes a revocation durable, then publishes it. Revoking a session also
    /// stops its refresh tokens; revoking a family stops that family.
    async fn revoke(&self, revocation: Revocation, now: u64) -> Result<(), StoreError>;

    /// Stores a new refresh token (the first of a family, at login).
    async fn put_refresh(&self, digest: &str, record: &RefreshRecord, now: u64) -> Result<(), StoreError>;

    /// The live record of a refresh token, spent or not. `None` when
    /// unknown or expired. Refresh reads it only for a token issued before
    /// tokens named their family (`<family>.<secret>`).
    async fn refresh_record(&self, digest: &str, now: u64) -> Result<Option<RefreshRecord>, StoreError>;

    /// Commits a refresh rotation atomically (see [`RefreshCommit`]):
    /// a live token is spent, its successor stored and the new access token
    /// recorded if it is to be ([`ConsumeOutcome::Rotated`]). A spent token presented again
    /// within `reuse_grace_secs` of its spend, whose successor was never
    /// used, replaces that successor ([`ConsumeOutcome::Retried`]). Any
    /// other second presentation revokes its family in the same step (until
    /// `next_expires_at`, which no earlier member outlives) and returns
    /// [`ConsumeOutcome::Reused`]. Only `Rotated` and `Retried` write the
    /// successor and the access token. Every outcome but `Invalid` returns
    /// the presented token's record.
    async fn commit_refresh(&self, commit: &RefreshCommit<'_>, now: u64) -> Result<ConsumeOutcome, StoreError>;

    /// Undoes a commit [`commit_refresh`](Store::commit_refresh) made with
    /// `commit` (the flow could not sign the new access token, or nobody
    /// was left to hand it to). The new access token's registry entry is
    /// deleted either way (it names a token never handed out).
    ///
    /// A [`Committed::Rotated`] commit is reversed: the presented token is
    /// unspent again and its successor deleted, so the client's retry is a
    /// plain refresh; only while that successor is still stored and
    /// unspent (it was never handed out, so nobody else can have used it):
    /// `false`, and nothing else changed, when another commit moved on
    /// meanwhile (a retry within the grace window replaced it, or a reuse
    /// revoked the family). A restored token whose family or session was
    /// revoked meanwhile stays refused by every commit.
    ///
    /// A [`Committed::Retried`] commit leaves the token spent as it was
    /// before the retry (its spend time, so its grace window, unchanged)
    /// and the retry's successor stored: `false`. Making it live again
    /// would give a stolen copy replayed while signing fails the whole
    /// refresh lifetime instead of the grace window.
    async fn undo_refresh(
        &self,
        commit: &RefreshCommit<'_>,
        committed: Committed,
        now: u64,
    ) -> Result<bool, StoreError>;

    /// Revokes the family or the session of a presented refresh token,
    /// spent or not (see [`RefreshRevoke`]): reads its record and writes
    /// the deny entry in one atomic step where the store keeps both
    /// together, and publishes the revocation once it is durable, like
    /// [`revoke`](Store::revoke). Returns the token's record and the
    /// revocation made; `None` (and nothing written) when the token is
    /// unknown or expired.
    async fn revoke_refresh(
        &self,
        revoke: &RefreshRevoke<'_>,
        now: u64,
    ) -> Result<Option<(RefreshRecord, Revocation)>, StoreError>;

    /// Every revocation still in force (jti and sid; families too).
    async fn revoked_snapshot(&self, now: u64) -> Result<Vec<Revocation>, StoreError>;

    /// A receiver of revocations as they are made (by this replica or, for
    /// shared stores, any replica).
    fn subscribe(&self) -> broadcast::Receiver<Revocation>;

    /// The state of the [`subscribe`](Store::subscribe) feed, as it
    /// changes. The in-memory store is always live in one epoch.
    fn feed_state(&self) -> watch::Receiver<FeedState>;

    /// Checks that the backend answers (readiness).
    async fn ping(&self) -> Result<(), StoreError>;

    /// How many entries the deny list holds, in one cheap, bounded read
    /// (`/metrics`); `None` when the store cannot tell.
    async fn deny_list_size(&self, now: u64) -> Result<Option<DenyListSize>, StoreError> {
        let _ = now;
        Ok(None)
    }

    /// A short name for logs: `memory` or `redis`.
    fn name(&self) -> &'static str;
}
