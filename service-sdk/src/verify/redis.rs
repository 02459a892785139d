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

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{Builder, ClientLike as _, Config, Pool, ReconnectPolicy};

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
    layout: KeyLayout,
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
        f.debug_struct("RedisRevocation").field("prefix", &self.shared.layout.prefix()).finish_non_exhaustive()
    }
}

impl RedisRevocation {
    /// Connects (in the background, reconnecting as needed) to the auth
    /// server's Redis at `url` (`redis://`, `rediss://`,
    /// `redis-sentinel://` or `redis-cluster://`), with key prefix `prefix`
    /// (the auth server's `redis.prefix`, default `auth`) and a per-lookup
    /// `timeout`. The key layout is the one the auth server's default
    /// `redis.layout = "auto"` picks for the same URL
    /// ([`KeyLayout::for_url`]): sharded for a cluster. Must be called
    /// within a tokio runtime.
    pub fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self, RedisSetupError> {
        Self::connect_with_layout(url, KeyLayout::for_url(prefix, url), timeout)
    }

    /// [`connect`](Self::connect) with an explicit layout: the auth
    /// server's `redis.layout` when it is not `auto`
    /// ([`KeyLayout::new`] for `single`, [`KeyLayout::sharded`] for
    /// `sharded`).
    pub fn connect_with_layout(url: &str, layout: KeyLayout, timeout: Duration) -> Result<Self, RedisSetupError> {
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
        let shared = Shared { pool, layout, timeout, connection };
        Ok(Self { shared: Arc::new(shared) })
    }
}

impl Shared {
    async fn is_revoked(&self, jti: &str, sid: Option<&str>, now: u64) -> Result<bool, VerifyError> {
        let calls = redis_layout::is_revoked(&self.layout, jti, sid, now);
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
        })
    }
}
