//! The Redis store (via `fred`): state shared by any number of replicas, and
//! revocations pushed to all of them over pub/sub.
//!
//! # Key layout
//!
//! Every key starts with `{P}:` where `P` is the configured prefix (default
//! `auth`), so several deployments can share one Redis. The braces are a
//! Redis Cluster hash tag: all keys of one deployment live in one slot, which
//! lets each Lua script touch all the keys it needs atomically. (A cluster
//! then gives failover, not sharding, for one deployment.)
//!
//! | key | type | holds | expires |
//! | --- | --- | --- | --- |
//! | `{P}:i:<jti>` | string | issued-`jti` registry and the `jti`'s deny mark: `<mark>\|<exp>\|<sid length or ->\|<sid><sub>`; `mark` is `0` (not revoked), `=` (revoked until `exp`) or the deny-until time; a revoked `jti` never recorded is just `<deny_until>\|` | `exp` + 60 s, or deny-until if later |
//! | `{P}:rv:jti:<m>` | list | revoked `jti`s whose deny-until falls in minute `m` (Unix seconds / 60), as `<seconds into the minute>\|<jti>`; only the snapshot reads it | end of minute `m` |
//! | `{P}:rv:jti:idx` | sorted set | the minutes `m` that have a bucket (score `m`) | latest bucket end |
//! | `{P}:rv:sid` | sorted set | revoked sessions: `sid` scored by deny-until | latest deny-until |
//! | `{P}:rv:family` | sorted set | revoked refresh families: family id scored by deny-until | latest deny-until |
//! | `{P}:rt:<digest>` | hash | a refresh token by SHA-256 digest: `family`, `sid`, `sub`, `client_id`, `audience` and `scope` (JSON arrays), `expires_at`, `spent` (`0`/`1`) | `expires_at` |
//!
//! Revocations are published on the channel `P:revocations` (no braces) as
//! `<kind>\|<deny_until>\|<id>` with kind `j`, `s` or `f`.
//!
//! Memory: an access token costs its one `{P}:i:` key (136 bytes by `MEMORY
//! USAGE` while the value fits Redis's 44-byte embedded string). Revoking it
//! rewrites the mark in place and adds a list entry of about 28 bytes to its
//! minute's bucket, where a second key or a sorted-set member would cost 80
//! to 120 bytes: a revoked live token costs about 162 bytes, under the 200
//! budget. `docs/REDIS.md` has the measured figures.
//!
//! # Atomicity and durability
//!
//! Every write is one Lua script (`EVALSHA`, falling back to `EVAL` after a
//! script-cache flush), so it is one atomic step and one round trip:
//! issuing a token writes one key; spending a refresh token checks its
//! family and session, marks it spent and stores its successor, or on reuse
//! revokes the family, all in one script. A revocation script writes the
//! deny entry and then `PUBLISH`es it; Redis writes replies and pub/sub
//! messages only after the script's effects are in the AOF (and fsynced, with
//! `appendfsync always`), so no replica hears of a revocation that is not
//! durable, and the caller's `Ok` means the same.
//!
//! # Failures
//!
//! Every command carries the configured timeout and is never retried by the
//! client (a retried refresh could pass for a reuse); a down, slow or
//! refusing Redis is [`StoreError::Unavailable`] (a reply the store cannot
//! read is [`StoreError::Corrupt`]). `fred` reconnects by itself. The subscriber
//! re-subscribes after a reconnect and then re-publishes the whole snapshot
//! to [`Store::subscribe`]rs, since messages sent while it was away are lost.
//!
//! Expiry is checked against the caller's clock (`now`); Redis TTLs are set
//! relative to it and only bound memory.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fred::clients::SubscriberClient;
use fred::prelude::{
    Builder, ClientLike, Config, Error as RedisError, ErrorKind, EventInterface, FromValue, HashesInterface,
    KeysInterface, LuaInterface, Pool, PubsubInterface, ReconnectPolicy,
};
use fred::types::config::UnresponsiveConfig;
// The read side of the layout is shared with the SDK's redis revocation
// mode, so the two cannot drift.
use service_sdk::verify::redis::{LUA_DENY_OF, LUA_IS_REVOKED};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use super::{ConsumeOutcome, IssuedToken, RefreshRecord, Revocation, RevocationKind, Store, StoreError};
use crate::config::RedisConfig;

/// How much longer than its token a registry entry lives.
const ISSUED_SLACK_SECS: u64 = 60;
/// Width of a revoked-`jti` bucket.
const BUCKET_SECS: u64 = 60;
/// Capacity of the revocation broadcast (and of fred's message channel).
const EVENT_CAPACITY: usize = 4096;

/// Shared helper: extend a key's TTL so it lives at least until `until`.
const LUA_KEEP_UNTIL: &str = r"
local function keep_until(key, until_, now)
  local want = until_ - now
  if want < 1 then want = 1 end
  if redis.call('TTL', key) < want then redis.call('EXPIRE', key, want) end
end
";

/// KEYS: registry key. ARGV: now, exp, body, slack.
const LUA_ISSUE: &str = r"
local now = tonumber(ARGV[1])
local deny = deny_of(redis.call('GET', KEYS[1]))
local mark = '0'
if deny > 0 then
  if deny == tonumber(ARGV[2]) then mark = '=' else mark = string.format('%d', deny) end
end
local until_ = tonumber(ARGV[2]) + tonumber(ARGV[4])
if deny > until_ then until_ = deny end
local ttl = until_ - now
if ttl < 1 then ttl = 1 end
redis.call('SET', KEYS[1], mark .. '|' .. ARGV[3], 'EX', ttl)
return 1
";

/// jti: KEYS registry key, bucket, bucket index; sid/family: KEYS set.
/// ARGV: now, kind, id, deny_until, channel, message, bucket, bucket_end,
/// bucket entry.
const LUA_REVOKE: &str = r"
local now = tonumber(ARGV[1])
local until_ = tonumber(ARGV[4])
if ARGV[2] == 'j' then
  local v = redis.call('GET', KEYS[1])
  if v then
    local rest = string.match(v, '^[^|]*|(.*)$')
    if not rest then return redis.error_reply('ERR corrupt registry entry') end
    if until_ > deny_of(v) then
      local mark = ARGV[4]
      if string.match(rest, '^([^|]*)') == ARGV[4] then mark = '=' end
      redis.call('SET', KEYS[1], mark .. '|' .. rest, 'KEEPTTL')
    end
  else
    redis.call('SET', KEYS[1], ARGV[4] .. '|')
  end
  keep_until(KEYS[1], until_, now)
  redis.call('RPUSH', KEYS[2], ARGV[9])
  keep_until(KEYS[2], tonumber(ARGV[8]), now)
  redis.call('ZADD', KEYS[3], ARGV[7], ARGV[7])
  keep_until(KEYS[3], tonumber(ARGV[8]), now)
else
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
  redis.call('ZADD', KEYS[1], 'GT', ARGV[4], ARGV[3])
  keep_until(KEYS[1], until_, now)
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
";

/// KEYS: refresh key. ARGV: now, family, sid, sub, client_id, audience,
/// scope, expires_at.
const LUA_PUT_REFRESH: &str = r"
local ttl = tonumber(ARGV[8]) - tonumber(ARGV[1])
if ttl < 1 then ttl = 1 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'family', ARGV[2], 'sid', ARGV[3], 'sub', ARGV[4], 'client_id', ARGV[5],
  'audience', ARGV[6], 'scope', ARGV[7], 'expires_at', ARGV[8], 'spent', '0')
redis.call('EXPIRE', KEYS[1], ttl)
return 1
";

/// KEYS: refresh key, successor key, family set, sid set.
/// ARGV: now, next_expires_at, channel.
const LUA_CONSUME: &str = r"
local now = tonumber(ARGV[1])
local nexp = tonumber(ARGV[2])
local h = redis.call('HMGET', KEYS[1], 'family', 'sid', 'sub', 'client_id', 'audience', 'scope', 'expires_at', 'spent')
if not h[1] or not h[2] or not h[7] then return {'invalid'} end
local exp = tonumber(h[7])
if not exp or exp <= now then return {'invalid'} end
local fs = redis.call('ZSCORE', KEYS[3], h[1])
if fs and tonumber(fs) > now then return {'invalid'} end
local ss = redis.call('ZSCORE', KEYS[4], h[2])
if ss and tonumber(ss) > now then return {'invalid'} end
if h[8] ~= '1' then
  redis.call('HSET', KEYS[1], 'spent', '1')
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2], 'family', h[1], 'sid', h[2], 'sub', h[3], 'client_id', h[4],
    'audience', h[5], 'scope', h[6], 'expires_at', ARGV[2], 'spent', '0')
  local ttl = nexp - now
  if ttl < 1 then ttl = 1 end
  redis.call('EXPIRE', KEYS[2], ttl)
  return {'rotated', h[1], h[2], h[3], h[4], h[5], h[6], h[7]}
end
local until_s = h[7]
if nexp > exp then until_s = ARGV[2] end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])
redis.call('ZADD', KEYS[3], 'GT', until_s, h[1])
keep_until(KEYS[3], tonumber(until_s), now)
redis.call('PUBLISH', ARGV[3], 'f|' .. until_s .. '|' .. h[1])
return {'reused', until_s}
";

/// KEYS: sid set, family set, bucket index. ARGV: now, bucket key prefix,
/// bucket width. Returns triples: `s`/`f`, id, deny_until for sessions and
/// families, `b`, minute, bucket entry for `jti`s (parsed by the caller).
/// Bucket keys are derived in the script; they share the hash tag of the
/// declared keys, so they live in the same cluster slot.
const LUA_SNAPSHOT: &str = r"
local now = tonumber(ARGV[1])
local out = {}
local kinds = {'s', 'f'}
for i = 1, 2 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[1])
  local r = redis.call('ZRANGE', KEYS[i], 0, -1, 'WITHSCORES')
  for j = 1, #r, 2 do
    out[#out + 1] = kinds[i]; out[#out + 1] = r[j]; out[#out + 1] = r[j + 1]
  end
end
local first = math.floor(now / tonumber(ARGV[3]))
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. string.format('%d', first))
local buckets = redis.call('ZRANGE', KEYS[3], 0, -1)
for _, b in ipairs(buckets) do
  local entries = redis.call('LRANGE', ARGV[2] .. b, 0, -1)
  for _, e in ipairs(entries) do
    out[#out + 1] = 'b'; out[#out + 1] = b; out[#out + 1] = e
  end
end
return out
";

/// A Lua script with its SHA-1, for `EVALSHA`.
struct Script {
    lua: String,
    sha: String,
}

impl Script {
    fn new(parts: &[&str]) -> Self {
        let lua = parts.concat();
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, lua.as_bytes());
        let sha = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Self { lua, sha }
    }
}

struct Scripts {
    issue: Script,
    is_revoked: Script,
    revoke: Script,
    put_refresh: Script,
    consume: Script,
    snapshot: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            issue: Script::new(&[LUA_DENY_OF, LUA_ISSUE]),
            is_revoked: Script::new(&[LUA_DENY_OF, LUA_IS_REVOKED]),
            revoke: Script::new(&[LUA_KEEP_UNTIL, LUA_DENY_OF, LUA_REVOKE]),
            put_refresh: Script::new(&[LUA_PUT_REFRESH]),
            consume: Script::new(&[LUA_KEEP_UNTIL, LUA_CONSUME]),
            snapshot: Script::new(&[LUA_SNAPSHOT]),
        }
    }
}

/// Key names for one prefix.
struct Keys {
    /// `{P}:`
    tag: String,
    /// `P:revocations`
    channel: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Self { tag: format!("{{{prefix}}}:"), channel: format!("{prefix}:revocations") }
    }
    fn issued(&self, jti: &str) -> String {
        format!("{}i:{jti}", self.tag)
    }
    fn bucket_prefix(&self) -> String {
        format!("{}rv:jti:", self.tag)
    }
    fn bucket(&self, b: u64) -> String {
        format!("{}rv:jti:{b}", self.tag)
    }
    fn bucket_index(&self) -> String {
        format!("{}rv:jti:idx", self.tag)
    }
    fn sids(&self) -> String {
        format!("{}rv:sid", self.tag)
    }
    fn families(&self) -> String {
        format!("{}rv:family", self.tag)
    }
    fn refresh(&self, digest: &str) -> String {
        format!("{}rt:{digest}", self.tag)
    }
}

/// What both the store and its subscriber task use.
struct Shared {
    pool: Pool,
    keys: Keys,
    scripts: Scripts,
    timeout: Duration,
}

impl Shared {
    /// Runs a script: one round trip, bounded by the command timeout.
    async fn eval<R: FromValue>(&self, script: &Script, keys: Vec<String>, args: Vec<String>) -> Result<R, StoreError> {
        let call = async {
            match self.pool.evalsha::<R, _, _, _>(script.sha.as_str(), keys.clone(), args.clone()).await {
                Err(e) if e.details().starts_with("NOSCRIPT") => {
                    self.pool.eval::<R, _, _, _>(script.lua.as_str(), keys, args).await
                }
                other => other,
            }
        };
        self.bounded(call).await
    }

    /// Bounds any fred call by the command timeout and maps its error.
    async fn bounded<R>(&self, call: impl Future<Output = Result<R, RedisError>>) -> Result<R, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(map_error),
            Err(_) => Err(StoreError::Unavailable("redis command timed out".into())),
        }
    }

    async fn snapshot(&self, now: u64) -> Result<Vec<Revocation>, StoreError> {
        let flat: Vec<String> = self
            .eval(
                &self.scripts.snapshot,
                vec![self.keys.sids(), self.keys.families(), self.keys.bucket_index()],
                vec![now.to_string(), self.keys.bucket_prefix(), BUCKET_SECS.to_string()],
            )
            .await?;
        let mut merged: HashMap<(RevocationKind, String), u64> = HashMap::new();
        let mut add = |kind, id: &str, until: u64| {
            let entry = merged.entry((kind, id.to_owned())).or_insert(0);
            *entry = (*entry).max(until);
        };
        for triple in flat.chunks(3) {
            let [kind, id, value] = triple else {
                return Err(StoreError::Corrupt("snapshot reply not in triples".into()));
            };
            if kind == "b" {
                let (jti, until) = parse_bucket_entry(parse_score(id)?, value)?;
                if until > now {
                    add(RevocationKind::Jti, jti, until);
                }
            } else {
                let kind = kind_from_code(kind).ok_or_else(|| StoreError::Corrupt("unknown revocation kind".into()))?;
                add(kind, id, parse_score(value)?);
            }
        }
        Ok(merged.into_iter().map(|((kind, id), expires_at)| Revocation { kind, id, expires_at }).collect())
    }
}

/// The Redis store. Cheap to share behind an `Arc`; dropping it stops its
/// subscriber and closes its connections.
pub struct RedisStore {
    shared: Arc<Shared>,
    subscriber: SubscriberClient,
    events: broadcast::Sender<Revocation>,
    /// Whether the subscriber is subscribed on its current connection.
    subscribed: watch::Receiver<bool>,
    forwarder: JoinHandle<()>,
}

impl std::fmt::Debug for RedisStore {
    // The URL may hold a password: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("channel", &self.shared.keys.channel).finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to Redis and subscribes to the revocation channel.
    ///
    /// Waits up to the command timeout for the first connection; if Redis is
    /// down it still returns the store, which keeps reconnecting in the
    /// background and answers [`StoreError::Unavailable`] (and fails
    /// [`Store::ping`]) until Redis is back. Fails only on a URL `fred`
    /// cannot parse.
    pub async fn connect(config: &RedisConfig) -> Result<Self, StoreError> {
        let timeout = Duration::from_millis(config.command_timeout_ms.max(1));
        let mut redis_config = Config::from_url(&config.url)
            .map_err(|e| StoreError::Unavailable(format!("invalid Redis URL ({:?})", e.kind())))?;
        // Keep reconnecting when Redis is down at start-up, too.
        redis_config.fail_fast = false;
        let mut builder = Builder::from_config(redis_config);
        builder
            .with_performance_config(|perf| {
                perf.default_command_timeout = timeout;
                perf.broadcast_channel_capacity = EVENT_CAPACITY;
            })
            .with_connection_config(|conn| {
                conn.connection_timeout = timeout;
                conn.internal_command_timeout = timeout;
                // Never replay a command after a broken connection: a
                // refresh that ran but lost its reply would look like reuse.
                conn.max_command_attempts = 1;
                // Drop a connection whose replies stop (a half-open socket)
                // rather than timing out every command on it forever.
                conn.unresponsive = UnresponsiveConfig {
                    max_timeout: Some(timeout),
                    interval: (timeout / 4).max(Duration::from_millis(10)),
                };
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2));
        let pool_size = config.pool_size.max(1);
        let pool = builder.build_pool(pool_size).map_err(map_error)?;
        let subscriber = builder.build_subscriber_client().map_err(map_error)?;

        let shared = Arc::new(Shared { pool, keys: Keys::new(&config.prefix), scripts: Scripts::new(), timeout });
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (subscribed_tx, mut subscribed_rx) = watch::channel(false);

        // Take the receivers before connecting, so the first connection
        // event is not missed.
        let forwarder = tokio::spawn(forward(
            Arc::clone(&shared),
            subscriber.clone(),
            subscriber.message_rx(),
            subscriber.reconnect_rx(),
            events.clone(),
            subscribed_tx,
        ));
        // Both spawn their connection tasks; the handles are not needed.
        drop(shared.pool.connect());
        drop(subscriber.connect());

        let ready = async {
            let _ = shared.pool.wait_for_connect().await;
            let _ = subscribed_rx.wait_for(|s| *s).await;
        };
        if tokio::time::timeout(timeout, ready).await.is_err() {
            tracing::warn!(prefix = %config.prefix, "redis not reachable yet; the store reconnects in the background");
        } else {
            tracing::info!(prefix = %config.prefix, pool_size, "redis store connected");
        }
        Ok(Self { shared, subscriber, events, subscribed: subscribed_rx, forwarder })
    }

    fn revocation_message(&self, revocation: &Revocation) -> String {
        format!("{}|{}|{}", kind_code(revocation.kind), revocation.expires_at, revocation.id)
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.forwarder.abort();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let pool = self.shared.pool.clone();
            let subscriber = self.subscriber.clone();
            handle.spawn(async move {
                let _ = pool.quit().await;
                let _ = subscriber.quit().await;
            });
        }
    }
}

/// Forwards channel messages into `events`; (re)subscribes on every
/// connection, and after a reconnect re-publishes the snapshot locally.
async fn forward(
    shared: Arc<Shared>,
    subscriber: SubscriberClient,
    mut messages: broadcast::Receiver<fred::types::Message>,
    mut connections: broadcast::Receiver<fred::types::config::Server>,
    events: broadcast::Sender<Revocation>,
    subscribed: watch::Sender<bool>,
) {
    use broadcast::error::RecvError;
    let channel = shared.keys.channel.clone();
    let mut connected_before = false;
    loop {
        tokio::select! {
            connection = connections.recv() => match connection {
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    subscribed.send_replace(false);
                    // Retry while this connection lasts; a new one brings a
                    // new event.
                    loop {
                        match shared.bounded(subscriber.subscribe(channel.as_str())).await {
                            Ok(()) => break,
                            Err(e) => tracing::warn!(error = %e, "redis revocation channel: subscribe failed"),
                        }
                        if !subscriber.is_connected() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    if !subscriber.is_connected() {
                        continue;
                    }
                    subscribed.send_replace(true);
                    if connected_before {
                        replay(&shared, &events).await;
                    }
                    connected_before = true;
                }
                Err(RecvError::Closed) => return,
            },
            message = messages.recv() => match message {
                Ok(message) => {
                    if message.channel != channel.as_str() {
                        continue;
                    }
                    match message.value.as_string().as_deref().and_then(parse_message) {
                        Some(revocation) => {
                            let _ = events.send(revocation);
                        }
                        None => tracing::warn!("redis revocation channel: unreadable message ignored"),
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "redis revocation channel lagged; replaying the snapshot");
                    replay(&shared, &events).await;
                }
                Err(RecvError::Closed) => return,
            },
        }
    }
}

/// Re-sends every stored revocation to local subscribers (after messages
/// may have been lost). `now = 0`: the store has no clock of its own, and a
/// stale entry is harmless to a deny set.
async fn replay(shared: &Shared, events: &broadcast::Sender<Revocation>) {
    match shared.snapshot(0).await {
        Ok(all) => {
            for revocation in all {
                let _ = events.send(revocation);
            }
        }
        Err(e) => tracing::warn!(error = %e, "redis revocation replay failed"),
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn record_issued(&self, jti: &str, token: &IssuedToken, now: u64) -> Result<(), StoreError> {
        let body = match &token.sid {
            Some(sid) => format!("{}|{}|{sid}{}", token.exp, sid.len(), token.sub),
            None => format!("{}|-|{}", token.exp, token.sub),
        };
        let _: i64 = self
            .shared
            .eval(
                &self.shared.scripts.issue,
                vec![self.shared.keys.issued(jti)],
                vec![now.to_string(), token.exp.to_string(), body, ISSUED_SLACK_SECS.to_string()],
            )
            .await?;
        Ok(())
    }

    async fn issued(&self, jti: &str, now: u64) -> Result<Option<IssuedToken>, StoreError> {
        let value: Option<String> = self.shared.bounded(self.shared.pool.get(self.shared.keys.issued(jti))).await?;
        let Some(value) = value else { return Ok(None) };
        let token = parse_issued(&value)?;
        Ok(token.filter(|t| t.exp > now))
    }

    async fn is_revoked(&self, jti: &str, sid: Option<&str>, now: u64) -> Result<bool, StoreError> {
        let revoked: i64 = self
            .shared
            .eval(
                &self.shared.scripts.is_revoked,
                vec![self.shared.keys.issued(jti), self.shared.keys.sids()],
                vec![now.to_string(), if sid.is_some() { "1" } else { "0" }.to_owned(), sid.unwrap_or("").to_owned()],
            )
            .await?;
        Ok(revoked == 1)
    }

    async fn revoke(&self, revocation: Revocation, now: u64) -> Result<(), StoreError> {
        let keys = &self.shared.keys;
        let bucket = revocation.expires_at / BUCKET_SECS;
        let bucket_end = (bucket + 1) * BUCKET_SECS;
        let redis_keys = match revocation.kind {
            RevocationKind::Jti => vec![keys.issued(&revocation.id), keys.bucket(bucket), keys.bucket_index()],
            RevocationKind::Sid => vec![keys.sids()],
            RevocationKind::Family => vec![keys.families()],
        };
        let args = vec![
            now.to_string(),
            kind_code(revocation.kind).to_owned(),
            revocation.id.clone(),
            revocation.expires_at.to_string(),
            keys.channel.clone(),
            self.revocation_message(&revocation),
            bucket.to_string(),
            bucket_end.to_string(),
            format!("{}|{}", revocation.expires_at % BUCKET_SECS, revocation.id),
        ];
        let _: i64 = self.shared.eval(&self.shared.scripts.revoke, redis_keys, args).await?;
        Ok(())
    }

    async fn put_refresh(&self, digest: &str, record: &RefreshRecord, now: u64) -> Result<(), StoreError> {
        let _: i64 = self
            .shared
            .eval(
                &self.shared.scripts.put_refresh,
                vec![self.shared.keys.refresh(digest)],
                vec![
                    now.to_string(),
                    record.family.clone(),
                    record.sid.clone(),
                    record.sub.clone(),
                    record.client_id.clone(),
                    encode_list(&record.audience)?,
                    encode_list(&record.scope)?,
                    record.expires_at.to_string(),
                ],
            )
            .await?;
        Ok(())
    }

    async fn refresh_record(&self, digest: &str, now: u64) -> Result<Option<RefreshRecord>, StoreError> {
        let fields: Vec<Option<String>> = self
            .shared
            .bounded(self.shared.pool.hmget(
                self.shared.keys.refresh(digest),
                vec!["family", "sid", "sub", "client_id", "audience", "scope", "expires_at"],
            ))
            .await?;
        if fields.iter().all(Option::is_none) {
            return Ok(None);
        }
        let fields: Vec<String> = fields
            .into_iter()
            .map(|f| f.ok_or_else(|| StoreError::Corrupt("refresh record incomplete".into())))
            .collect::<Result<_, _>>()?;
        let record = parse_refresh(&fields)?;
        Ok(Some(record).filter(|r| r.expires_at > now))
    }

    async fn consume_refresh(
        &self,
        digest: &str,
        next_digest: &str,
        next_expires_at: u64,
        now: u64,
    ) -> Result<ConsumeOutcome, StoreError> {
        let keys = &self.shared.keys;
        let reply: Vec<String> = self
            .shared
            .eval(
                &self.shared.scripts.consume,
                vec![keys.refresh(digest), keys.refresh(next_digest), keys.families(), keys.sids()],
                vec![now.to_string(), next_expires_at.to_string(), keys.channel.clone()],
            )
            .await?;
        match reply.first().map(String::as_str) {
            Some("rotated") => Ok(ConsumeOutcome::Rotated(parse_refresh(&reply[1..])?)),
            Some("reused") => Ok(ConsumeOutcome::Reused),
            Some("invalid") => Ok(ConsumeOutcome::Invalid),
            _ => Err(StoreError::Corrupt("unexpected refresh script reply".into())),
        }
    }

    async fn revoked_snapshot(&self, now: u64) -> Result<Vec<Revocation>, StoreError> {
        self.shared.snapshot(now).await
    }

    fn subscribe(&self) -> broadcast::Receiver<Revocation> {
        self.events.subscribe()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // Every pooled connection, not just one: commands are never retried,
        // so "ready" must mean the next command lands on a live connection,
        // whichever connection the pool picks.
        for client in self.shared.pool.clients() {
            let _: String = self.shared.bounded(client.ping(None)).await?;
        }
        if !self.subscriber.is_connected() || !*self.subscribed.borrow() {
            return Err(StoreError::Unavailable("redis revocation subscriber disconnected".into()));
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

/// Maps a fred error to a store error. The text names the error class and
/// Redis's error code only, never keys or arguments.
fn map_error(e: RedisError) -> StoreError {
    let code = e.details().split_whitespace().next().unwrap_or("").to_owned();
    match e.kind() {
        ErrorKind::InvalidArgument | ErrorKind::Parse | ErrorKind::Protocol => {
            StoreError::Corrupt(format!("redis replied {:?} {code}", e.kind()))
        }
        ErrorKind::Unknown if code == "ERR" => StoreError::Corrupt("redis script failed".into()),
        // IO, timeouts, cancellation, TLS, auth, cluster and server states
        // such as LOADING, MISCONF, OOM, READONLY, BUSY.
        kind => StoreError::Unavailable(format!("redis {kind:?} {code}").trim_end().to_owned()),
    }
}

fn kind_code(kind: RevocationKind) -> &'static str {
    match kind {
        RevocationKind::Jti => "j",
        RevocationKind::Sid => "s",
        RevocationKind::Family => "f",
    }
}

fn kind_from_code(code: &str) -> Option<RevocationKind> {
    match code {
        "j" => Some(RevocationKind::Jti),
        "s" => Some(RevocationKind::Sid),
        "f" => Some(RevocationKind::Family),
        _ => None,
    }
}

/// Parses a channel message `<kind>|<deny_until>|<id>`.
fn parse_message(text: &str) -> Option<Revocation> {
    let mut parts = text.splitn(3, '|');
    let kind = kind_from_code(parts.next()?)?;
    let expires_at = parts.next()?.parse().ok()?;
    let id = parts.next()?.to_owned();
    Some(Revocation { kind, id, expires_at })
}

/// Parses a sorted-set score or hash value holding Unix seconds. Redis may
/// print large integral scores in floating-point notation.
fn parse_score(text: &str) -> Result<u64, StoreError> {
    if let Ok(v) = text.parse::<u64>() {
        return Ok(v);
    }
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= u64::MAX as f64 => Ok(v as u64),
        _ => Err(StoreError::Corrupt("unreadable expiry".into())),
    }
}

/// Parses a registry value `<mark>|<exp>|<sid_len or ->|<sid><sub>`;
/// `None` for a deny mark with no issued record (`<deny_until>|`).
fn parse_issued(value: &str) -> Result<Option<IssuedToken>, StoreError> {
    let corrupt = || StoreError::Corrupt("issued-token entry unreadable".into());
    let (_mark, rest) = value.split_once('|').ok_or_else(corrupt)?;
    if rest.is_empty() {
        return Ok(None);
    }
    let (exp, rest) = rest.split_once('|').ok_or_else(corrupt)?;
    let exp = exp.parse().map_err(|_| corrupt())?;
    let (sid_len, rest) = rest.split_once('|').ok_or_else(corrupt)?;
    let (sid, sub) = if sid_len == "-" {
        (None, rest)
    } else {
        let n: usize = sid_len.parse().map_err(|_| corrupt())?;
        if !rest.is_char_boundary(n) {
            return Err(corrupt());
        }
        let (sid, sub) = rest.split_at(n);
        (Some(sid.to_owned()), sub)
    };
    Ok(Some(IssuedToken { sub: sub.to_owned(), sid, exp }))
}

/// Parses an entry `<seconds into the minute>|<jti>` of the revoked-`jti`
/// bucket of minute `minute`.
fn parse_bucket_entry(minute: u64, entry: &str) -> Result<(&str, u64), StoreError> {
    let corrupt = || StoreError::Corrupt("revoked-jti bucket entry unreadable".into());
    let (offset, jti) = entry.split_once('|').ok_or_else(corrupt)?;
    let offset: u64 = offset.parse().map_err(|_| corrupt())?;
    Ok((jti, minute * BUCKET_SECS + offset))
}

fn encode_list(items: &[String]) -> Result<String, StoreError> {
    serde_json::to_string(items).map_err(|_| StoreError::Corrupt("cannot encode list".into()))
}

fn decode_list(text: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text).map_err(|_| StoreError::Corrupt("refresh record list unreadable".into()))
}

/// Parses `[family, sid, sub, client_id, audience, scope, expires_at]`.
fn parse_refresh(fields: &[String]) -> Result<RefreshRecord, StoreError> {
    let [family, sid, sub, client_id, audience, scope, expires_at] = fields else {
        return Err(StoreError::Corrupt("refresh record has the wrong shape".into()));
    };
    Ok(RefreshRecord {
        family: family.clone(),
        sid: sid.clone(),
        sub: sub.clone(),
        client_id: client_id.clone(),
        audience: decode_list(audience)?,
        scope: decode_list(scope)?,
        expires_at: parse_score(expires_at)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_entry_round_trips_any_sid_and_sub() {
        for (sid, sub) in [(Some("s|1"), "alice|x"), (None, "svc:order"), (Some(""), "")] {
            let body = match sid {
                Some(sid) => format!("0|42|{}|{sid}{sub}", sid.len()),
                None => format!("0|42|-|{sub}"),
            };
            let token = parse_issued(&body).unwrap().unwrap();
            assert_eq!(token, IssuedToken { sub: sub.into(), sid: sid.map(Into::into), exp: 42 });
        }
    }

    #[test]
    fn deny_mark_without_record_is_not_an_issued_token() {
        assert_eq!(parse_issued("1700000000|").unwrap(), None);
    }

    #[test]
    fn channel_message_keeps_separators_in_the_id() {
        let r = parse_message("s|99|a|b").unwrap();
        assert_eq!(r, Revocation { kind: RevocationKind::Sid, id: "a|b".into(), expires_at: 99 });
        assert!(parse_message("x|1|a").is_none());
    }

    #[test]
    fn bucket_entries_keep_separators_in_the_jti() {
        assert_eq!(parse_bucket_entry(10, "5|a|b").unwrap(), ("a|b", 605));
        assert!(parse_bucket_entry(10, "x|ab").is_err());
    }

    #[test]
    fn scores_in_float_notation_parse() {
        assert_eq!(parse_score("1.7642200000000000e+09").unwrap(), 1_764_220_000);
        assert!(parse_score("1.5").is_err());
    }
}
