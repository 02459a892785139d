//! Revocation by a direct per-request Redis lookup (feature `redis`): the
//! seed's design, for deployments that prefer one Redis round trip per
//! uncached-or-cached request to a pushed deny set.
//!
//! # Key layout
//!
//! This reads the auth server's Redis store through the one
//! [`KeyLayout`](crate::redis_layout::KeyLayout) and the one is-revoked
//! script ([`redis_layout::is_revoked`](crate::redis_layout::is_revoked))
//! that the store itself uses, so the two cannot drift; the integration
//! tests also run this check against a real auth-server on a real Redis.
//! It reads the `jti`'s deny mark and, for a token with a `sid`, the set of
//! revoked sessions.
//!
//! With the single-slot layout one Lua script reads both atomically
//! (`EVALSHA`, falling back to `EVAL` after a script-cache flush); with the
//! sharded layout of a Redis Cluster the mark and the session live in
//! different shards, and two scripts read them concurrently (one round
//! trip of wall time). Any failure or timeout fails closed with
//! [`VerifyError::RevocationUnavailable`].
//!
//! # Which layout
//!
//! The layout is the one the auth server recorded in the layout marker
//! (`{P}:layout`, see [`redis_layout`](crate::redis_layout)), never a guess
//! from the URL: a server with an explicit `redis.layout` writes other keys
//! than the URL suggests, and a check reading the wrong keys would pass
//! revoked tokens. The check reads the marker on its first lookup (and in
//! [`ready`](RevocationCheck::ready)) and keeps it; until an auth server
//! has written it (on connecting to this Redis), every check fails closed,
//! as a pushed deny set does until its first snapshot. A marker naming a
//! layout or format this version does not know, or (with
//! [`RedisRevocation::connect_with_layout`]) another layout than the one
//! asked for, fails closed too, and is logged.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fred::prelude::{Builder, ClientLike as _, Config, KeysInterface as _, Pool, ReconnectPolicy};

use super::VerifyError;
use super::revocation::{RevocationCheck, RevocationLookup};
use crate::redis_layout::{self, KeyLayout};

/// Why [`RedisRevocation::connect`] failed. Never includes the URL (it may
/// hold a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RedisSetupError {
    /// The URL could not be parsed.
    #[error("invalid Redis URL")]
    InvalidUrl,
    /// The client could not be built.
    #[error("Redis client setup failed: {0}")]
    Client(String),
}

struct Shared {
    pool: Pool,
    /// The deployment's prefix (`redis.prefix`).
    prefix: String,
    /// The layout the caller asked for, if any: the marker must name it.
    expected: Option<KeyLayout>,
    /// The layout the marker names, once read.
    layout: OnceLock<KeyLayout>,
    timeout: Duration,
    connection: tokio::task::JoinHandle<Result<(), fred::error::Error>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// The redis-mode revocation check: one Lua round trip per request (two
/// concurrent ones in a cluster's sharded layout), failing
/// closed when Redis does not answer within the timeout.
#[derive(Clone)]
pub struct RedisRevocation {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisRevocation {
    // The URL may hold a password: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRevocation").field("prefix", &self.shared.prefix).finish_non_exhaustive()
    }
}

impl RedisRevocation {
    /// Connects (in the background, reconnecting as needed) to the auth
    /// server's Redis at `url` (`redis://`, `rediss://`,
    /// `redis-sentinel://` or `redis-cluster://`), with key prefix `prefix`
    /// (the auth server's `redis.prefix`, default `auth`) and a per-lookup
    /// `timeout`. The key layout is the one the auth server recorded in
    /// the layout marker ([`KeyLayout::marker`]); checks fail closed
    /// until it is there. Must be called within a tokio runtime.
    pub fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self, RedisSetupError> {
        Self::build(url, prefix, None, timeout)
    }

    /// [`connect`](Self::connect), insisting on `layout` (and its prefix):
    /// checks fail closed while the layout marker names another one.
    pub fn connect_with_layout(url: &str, layout: KeyLayout, timeout: Duration) -> Result<Self, RedisSetupError> {
        let prefix = layout.prefix().to_owned();
        Self::build(url, &prefix, Some(layout), timeout)
    }

    fn build(url: &str, prefix: &str, expected: Option<KeyLayout>, timeout: Duration) -> Result<Self, RedisSetupError> {
        let mut config = Config::from_url(url).map_err(|_| RedisSetupError::InvalidUrl)?;
        config.fail_fast = false;
        let mut builder = Builder::from_config(config);
        builder
            .with_performance_config(|perf| perf.default_command_timeout = timeout)
            .with_connection_config(|conn| {
                conn.connection_timeout = timeout;
                conn.internal_command_timeout = timeout;
                conn.max_command_attempts = 1;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2));
        let pool = builder.build_pool(2).map_err(|e| RedisSetupError::Client(e.kind().to_str().to_owned()))?;
        let connection = pool.connect();
        let shared = Shared { pool, prefix: prefix.to_owned(), expected, layout: OnceLock::new(), timeout, connection };
        Ok(Self { shared: Arc::new(shared) })
    }
}

/// Why the layout marker gives no layout to read.
#[derive(Debug)]
enum MarkerError {
    /// Redis did not answer (in time).
    Unavailable(String),
    /// No auth server has connected to this Redis with this prefix yet.
    Missing,
    /// A layout or format this version does not know.
    Unknown(redis_layout::UnknownMarker),
    /// Another layout than the one asked for.
    Other { expected: &'static str, found: &'static str },
}

impl Shared {
    /// The layout the marker names: read once, then kept (a layout never
    /// changes under a running auth server, which refuses another one).
    async fn layout(&self) -> Result<&KeyLayout, MarkerError> {
        if let Some(layout) = self.layout.get() {
            return Ok(layout);
        }
        let key = KeyLayout::marker_key(&self.prefix);
        let value: Option<String> = match tokio::time::timeout(self.timeout, self.pool.get(key)).await {
            Ok(Ok(value)) => value,
            Ok(Err(e)) => return Err(MarkerError::Unavailable(format!("{:?}", e.kind()))),
            Err(_) => return Err(MarkerError::Unavailable("timed out".into())),
        };
        let layout =
            KeyLayout::from_marker(&self.prefix, &value.ok_or(MarkerError::Missing)?).map_err(MarkerError::Unknown)?;
        if let Some(expected) = &self.expected
            && *expected != layout
        {
            return Err(MarkerError::Other { expected: expected.name(), found: layout.name() });
        }
        Ok(self.layout.get_or_init(|| layout))
    }

    /// [`layout`](Self::layout), logging why there is none.
    async fn layout_or_refuse(&self) -> Result<&KeyLayout, VerifyError> {
        self.layout().await.map_err(|e| {
            match e {
                MarkerError::Unavailable(cause) => {
                    tracing::warn!(%cause, "redis layout marker unreadable; refusing");
                }
                MarkerError::Missing => tracing::warn!(
                    prefix = %self.prefix,
                    "no redis layout marker yet (no auth server has connected to this Redis with this prefix); refusing"
                ),
                MarkerError::Unknown(e) => tracing::error!(prefix = %self.prefix, error = %e, "refusing"),
                MarkerError::Other { expected, found } => tracing::error!(
                    prefix = %self.prefix,
                    expected,
                    found,
                    "the auth server's redis key layout is not the one this check was built for; refusing"
                ),
            }
            VerifyError::RevocationUnavailable
        })
    }

    async fn is_revoked(&self, jti: &str, sid: Option<&str>, now: u64) -> Result<bool, VerifyError> {
        let layout = self.layout_or_refuse().await?;
        let calls = redis_layout::is_revoked(layout, jti, sid, now);
        match tokio::time::timeout(self.timeout, redis_layout::run_is_revoked(calls, &self.pool)).await {
            Ok(Ok(revoked)) => Ok(revoked),
            Ok(Err(e)) => {
                tracing::warn!(kind = ?e.kind(), "redis revocation lookup failed; refusing");
                Err(VerifyError::RevocationUnavailable)
            }
            Err(_) => {
                tracing::warn!("redis revocation lookup timed out; refusing");
                Err(VerifyError::RevocationUnavailable)
            }
        }
    }
}

impl RevocationCheck for RedisRevocation {
    fn check(&self, jti: &str, sid: Option<&str>, now: u64) -> RevocationLookup {
        let shared = Arc::clone(&self.shared);
        let (jti, sid) = (jti.to_owned(), sid.map(str::to_owned));
        RevocationLookup::Pending(Box::pin(async move {
            match shared.is_revoked(&jti, sid.as_deref(), now).await? {
                true => Err(VerifyError::Revoked),
                false => Ok(()),
            }
        }))
    }

    fn ready(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            if let Err(e) = self.shared.pool.wait_for_connect().await {
                tracing::warn!(kind = ?e.kind(), "redis not connected");
            }
            // Until the marker is read, every check refuses: wait for it,
            // as long as it takes an auth server to write it.
            let mut pause = Duration::from_millis(20);
            if self.shared.layout_or_refuse().await.is_ok() {
                return;
            }
            while self.shared.layout().await.is_err() {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        })
    }
}
