//! Revocation by a direct per-request Redis lookup (feature `redis`): the
//! seed's design, for deployments that prefer one Redis round trip per
//! uncached-or-cached request to a pushed deny set.
//!
//! # Key layout
//!
//! This reads the auth server's Redis store (`auth-server/src/store/redis.rs`
//! is the authority) and must agree with it; the integration tests run this
//! check against a real auth-server on a real Redis to keep the two in step.
//! With `P` the configured prefix (default `auth`):
//!
//! - `{P}:i:<jti>`: the issued-`jti` registry entry, whose first field is the
//!   deny mark: `0` (not revoked), `=` (revoked until the token's `exp`, the
//!   second field) or the deny-until time;
//! - `{P}:rv:sid`: sorted set of revoked sessions scored by deny-until.
//!
//! One Lua script reads both atomically (`EVALSHA`, falling back to `EVAL`
//! after a script-cache flush). Any failure or timeout fails closed with
//! [`VerifyError::RevocationUnavailable`].

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{Builder, ClientLike as _, Config, LuaInterface as _, Pool, ReconnectPolicy};

use super::VerifyError;
use super::revocation::{RevocationCheck, RevocationLookup};

/// Lua helper shared with the auth server's store: the deny-until time of
/// a registry value (`0` if none).
pub const LUA_DENY_OF: &str = r"
local function deny_of(v)
  if not v then return 0 end
  local mark, exp = string.match(v, '^([^|]*)|([^|]*)')
  if mark == '=' then return tonumber(exp) or 0 end
  return tonumber(mark) or 0
end
";

/// Lua body shared with the auth server's store (prefix it with
/// [`LUA_DENY_OF`]). KEYS: registry key, sid set. ARGV: now, has_sid, sid.
pub const LUA_IS_REVOKED: &str = r"
local now = tonumber(ARGV[1])
if deny_of(redis.call('GET', KEYS[1])) > now then return 1 end
if ARGV[2] == '1' then
  local s = redis.call('ZSCORE', KEYS[2], ARGV[3])
  if s and tonumber(s) > now then return 1 end
end
return 0
";

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
    tag: String,
    lua: String,
    sha: String,
    timeout: Duration,
    connection: tokio::task::JoinHandle<Result<(), fred::error::Error>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// The redis-mode revocation check: one Lua round trip per request, failing
/// closed when Redis does not answer within the timeout.
#[derive(Clone)]
pub struct RedisRevocation {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisRevocation {
    // The URL may hold a password: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRevocation").field("prefix", &self.shared.tag).finish_non_exhaustive()
    }
}

impl RedisRevocation {
    /// Connects (in the background, reconnecting as needed) to the auth
    /// server's Redis at `url` (`redis://` or `rediss://`), with key prefix
    /// `prefix` (the auth server's `redis.prefix`, default `auth`) and a
    /// per-lookup `timeout`. Must be called within a tokio runtime.
    pub fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self, RedisSetupError> {
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
        let lua = [LUA_DENY_OF, LUA_IS_REVOKED].concat();
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, lua.as_bytes());
        let sha = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let shared = Shared { pool, tag: format!("{{{prefix}}}:"), lua, sha, timeout, connection };
        Ok(Self { shared: Arc::new(shared) })
    }
}

impl Shared {
    async fn is_revoked(&self, jti: &str, sid: Option<&str>, now: u64) -> Result<bool, VerifyError> {
        let keys = vec![format!("{}i:{jti}", self.tag), format!("{}rv:sid", self.tag)];
        let args =
            vec![now.to_string(), if sid.is_some() { "1" } else { "0" }.to_owned(), sid.unwrap_or("").to_owned()];
        let call = async {
            match self.pool.evalsha::<i64, _, _, _>(self.sha.as_str(), keys.clone(), args.clone()).await {
                Err(e) if e.details().starts_with("NOSCRIPT") => {
                    self.pool.eval::<i64, _, _, _>(self.lua.as_str(), keys, args).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(n)) => Ok(n == 1),
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
