//! The Redis store (via `fred`): state shared by any number of replicas, and
//! revocations pushed to all of them over pub/sub.
//!
//! # Parts
//!
//! - `keys`: where entries live. Key names come from the
//!   [`KeyLayout`](service_sdk::redis_layout::KeyLayout) shared with the
//!   SDK's Redis revocation mode; its docs hold the table of keys, values and
//!   expiries, and the channel. Every key of the single-slot layout carries
//!   the hash tag `{P}` (`P` the configured prefix); the sharded layout
//!   (`redis.layout`, the default for cluster URLs) tags a refresh family's
//!   keys by the family and spreads the deny list over 16 shards. Either
//!   way each script touches one slot, and what a sharded step needs from
//!   another slot (a rotated token's session, a reused family's snapshot
//!   entry, a rotation's registry entry) is a separate call around it.
//! - `scripts`: the Lua scripts and the one function per script that builds
//!   its KEYS and ARGV; a unit test checks every script's KEYS share a slot.
//! - `codec`: how records, bucket entries and channel messages are written
//!   and read back, and the scripts' replies.
//! - `subscriber`: the pub/sub subscription's lifecycle (connect,
//!   subscribe, retry, liveness pings, epochs).
//! - `durable`: writes acknowledged only once enough replicas have them.
//! - `marker`: the layout marker (`{P}:layout`), claimed at connect and by
//!   readiness, checked before the first command: a replica of another
//!   `redis.layout` refuses to start.
//!
//! Memory: an issued access token costs nothing unless
//! `tokens.record_issued` records it, in one registry key (136 bytes by
//! `MEMORY USAGE` while the value fits Redis's 44-byte embedded string).
//! Revoking a token writes its deny mark in that key (in place, when it is
//! recorded) and adds a list entry of about 28 bytes to its minute's
//! bucket, where a second key or a sorted-set member would cost 80 to 120
//! bytes: a revoked live token costs under the 200-byte budget either way.
//! `docs/REDIS.md` has the measured figures.
//!
//! # Atomicity and durability
//!
//! Every write is one Lua script (`EVALSHA`, falling back to `EVAL` after a
//! script-cache flush), so it is one atomic step and one round trip:
//! recording an issued token (when the registry is on) writes one key;
//! committing a refresh checks the token's family and session, marks it
//! spent, stores its successor and records the new access token if it is
//! to be (the registry entry built from the record the script reads; the
//! token is signed after the script, from the record it returns), or on
//! reuse revokes the family, all in one script; a revocation by refresh
//! token reads the token's record and writes the deny entry in one script
//! too (in the sharded layout a session's entry, in another slot, is a
//! second script). A revocation script writes the
//! deny entry and then `PUBLISH`es it; Redis writes replies and pub/sub
//! messages only after the script's effects are in the AOF (and fsynced, with
//! `appendfsync always`), so the caller's `Ok` means the write is on the
//! primary's disk. With `redis.min_replicas_acked` > 0 it also means that
//! many replicas have it: `durable` sends each write script with `WAIT`
//! behind it on the same connection, and fewer acknowledgements are
//! [`StoreError::NotDurable`] (the write may exist, but is not
//! acknowledged).
//!
//! # Failures
//!
//! Every command carries the configured timeout and is never retried by the
//! client (a retried refresh could pass for a reuse); a down, slow or
//! refusing Redis is [`StoreError::Unavailable`] (a reply the store cannot
//! read is [`StoreError::Corrupt`]). `fred` reconnects by itself. The subscriber
//! re-subscribes after a reconnect and starts a new epoch of
//! [`Store::feed_state`], since messages sent while it was away are lost;
//! it pings its connection, and the feed is not live while the
//! subscription is cut off (see `subscriber`).
//!
//! Why a connection fails is logged once per cause, with the URL (its
//! password redacted) and fred's error (an authentication refusal such as
//! `NOAUTH` or `WRONGPASS`, a failed DNS lookup, a refused connection), and
//! a command that fails while the store is not connected names that cause
//! instead of a bare timeout. [`Store::ping`] (readiness) also writes a
//! short-lived probe key (`{P}:ready`), so a Redis that answers but refuses
//! writes (`OOM` under `maxmemory`, a `READONLY` replica, `MISCONF` after a
//! failed snapshot) is not ready, and says why.
//!
//! Expiry is checked against the caller's clock (`now`); Redis TTLs are set
//! relative to it and only bound memory.

mod codec;
mod durable;
mod keys;
mod marker;
mod scripts;
mod subscriber;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::{
    Builder, ClientLike, Config, Error as RedisError, ErrorKind, EventInterface, Expiration, FromValue,
    HashesInterface, KeysInterface, Pool, ReconnectPolicy,
};
use fred::types::config::{ReconnectError, UnresponsiveConfig};
use service_sdk::redis_layout::ScriptCall;
use tokio::sync::{broadcast, watch};

use self::codec::{
    REFRESH_FIELDS, Snapshot, parse_commit_reply, parse_issued, parse_refresh_fields, parse_reuse,
    parse_revoke_refresh_reply, parse_score,
};
use self::durable::Durability;
use self::keys::KeyLayout;
use self::subscriber::{EVENT_CAPACITY, Subscriber};
use super::{
    Committed, ConsumeOutcome, DenyListSize, FeedState, IssuedToken, RefreshCommit, RefreshRecord, RefreshRevoke,
    Revocation, RevocationKind, Store, StoreError,
};
use crate::config::{RedisConfig, redact_url};

/// Entries per command when a snapshot reads the deny list: a page of
/// revoked `jti`s is about 300 KB and a few milliseconds of Redis time.
const SNAPSHOT_PAGE: usize = 10_000;

/// How long the readiness probe key lives: it only shows that a write
/// went through.
const READY_PROBE_TTL_MS: i64 = 10_000;

/// What both the store and its subscriber task use.
struct Shared {
    pool: Pool,
    /// The connections durable writes use (with `min_replicas_acked` > 0):
    /// their `WAIT` blocks the connection, so nothing else goes there.
    durable_pool: Option<Pool>,
    layout: KeyLayout,
    /// Whether the layout marker was found naming `layout` (see `marker`).
    claimed: AtomicBool,
    /// Whether a claim of the marker was acknowledged by
    /// `min_replicas_acked` replicas (see `marker`).
    marker_durable: AtomicBool,
    timeout: Duration,
    /// How many replicas must have a write before it is acknowledged.
    durability: Durability,
    /// The Redis URL with its password redacted, for logs.
    url: String,
    /// Why the last connection attempt failed, until a connection works
    /// again.
    connect_error: std::sync::Mutex<Option<String>>,
}

impl Shared {
    /// Runs a script call: one round trip, bounded by the command timeout.
    async fn eval<R: FromValue>(&self, call: ScriptCall<'_>) -> Result<R, StoreError> {
        self.bounded(call.run(&self.pool)).await
    }

    /// Bounds any fred call by the command timeout and maps its error. A
    /// call that fails while connections are failing names their cause.
    /// Runs only once the layout marker names this store's layout.
    async fn bounded<R>(&self, call: impl Future<Output = Result<R, RedisError>>) -> Result<R, StoreError> {
        self.layout_claimed().await?;
        self.unchecked(call).await
    }

    /// [`bounded`](Self::bounded), without waiting for the layout marker.
    async fn unchecked<R>(&self, call: impl Future<Output = Result<R, RedisError>>) -> Result<R, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.with_cause(map_error(e))),
            Err(_) => Err(self.with_cause(StoreError::Unavailable("redis command timed out".into()))),
        }
    }

    /// An outage while connections are failing is reported as their cause.
    fn with_cause(&self, error: StoreError) -> StoreError {
        match (&error, self.connect_error()) {
            (StoreError::Unavailable(_), Some(cause)) => {
                StoreError::Unavailable(format!("redis not connected: {cause}"))
            }
            _ => error,
        }
    }

    /// Why connections are failing, if they are.
    fn connect_error(&self) -> Option<String> {
        self.connect_error.lock().ok().and_then(|e| e.clone())
    }

    /// A connection attempt (or an open connection) failed: logs the cause
    /// with the URL when it differs from the last one logged.
    fn connection_failed(&self, error: &RedisError) {
        let cause = describe(error);
        let Ok(mut last) = self.connect_error.lock() else { return };
        if last.as_deref() != Some(cause.as_str()) {
            tracing::warn!(url = %self.url, error = %cause, "redis connection failed; reconnecting");
        }
        *last = Some(cause);
    }

    /// A connection was made: once every pooled connection is up, the last
    /// failure is over.
    fn connected(&self) {
        if !self.clients().all(|c| c.is_connected()) {
            return;
        }
        let Ok(mut last) = self.connect_error.lock() else { return };
        if last.take().is_some() {
            tracing::info!(url = %self.url, "redis connection restored");
        }
    }

    /// Every pooled connection: the main pool's and the durable writes'.
    fn clients(&self) -> impl Iterator<Item = &fred::clients::Client> {
        self.pool.clients().iter().chain(self.durable_pool.iter().flat_map(|p| p.clients()))
    }

    /// Watches `client`'s connection events: failures and reconnections.
    fn watch(self: &Arc<Self>, client: &impl EventInterface) -> tokio::task::JoinHandle<()> {
        use tokio::sync::broadcast::error::RecvError;
        let (mut errors, mut connections) = (client.error_rx(), client.reconnect_rx());
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    error = errors.recv() => match error {
                        Ok((error, _)) => shared.connection_failed(&error),
                        Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => return,
                    },
                    connection = connections.recv() => match connection {
                        Ok(_) | Err(RecvError::Lagged(_)) => shared.connected(),
                        Err(RecvError::Closed) => return,
                    },
                }
            }
        })
    }

    /// A tiny write with a short expiry: fails, saying why, when Redis
    /// answers but refuses writes.
    async fn probe_write(&self) -> Result<(), StoreError> {
        let key = keys::ready_probe(&self.layout);
        let write =
            self.pool.set::<Option<String>, _, _>(key, 1, Some(Expiration::PX(READY_PROBE_TTL_MS)), None, false);
        match tokio::time::timeout(self.timeout, write).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if WRITE_REFUSALS.contains(&reply_code(&e)) => {
                Err(StoreError::Unavailable(format!("redis refuses writes: {}", describe(&e))))
            }
            Ok(Err(e)) => Err(self.with_cause(map_error(e))),
            Err(_) => Err(self.with_cause(StoreError::Unavailable("redis command timed out".into()))),
        }
    }

    /// Every revocation in force at `now`, from every deny shard, read in
    /// pages of [`SNAPSHOT_PAGE`] entries: one short command each, so that
    /// a deny list of any size neither blocks Redis for the other replicas
    /// nor meets the command timeout.
    ///
    /// The pages are not one atomic read, and need not be: entries are only
    /// ever added (or pruned once expired), and a caller that must miss
    /// nothing subscribes before it reads. Sorted sets are read highest
    /// deny-until first, so an entry pruned meanwhile leaves from the end
    /// and a new one only repeats an entry already read. An entry whose
    /// deny-until is raised meanwhile may move past the cursor, but raising
    /// it publishes it again.
    async fn snapshot(&self, now: u64) -> Result<Vec<Revocation>, StoreError> {
        let mut snapshot = Snapshot::default();
        for shard in self.layout.deny_shards() {
            let minutes: Vec<String> = self.eval(scripts::snapshot_prune(shard, now)).await?;
            for (key, kind) in [(shard.sessions(), RevocationKind::Sid), (shard.families(), RevocationKind::Family)] {
                let mut offset = 0;
                loop {
                    let page: Vec<String> = self.eval(scripts::scored_page(key, now, offset, SNAPSHOT_PAGE)).await?;
                    snapshot.add_scored(kind, &page)?;
                    if page.len() < 2 * SNAPSHOT_PAGE {
                        break;
                    }
                    offset += SNAPSHOT_PAGE;
                }
            }
            for minute in &minutes {
                let minute = parse_score(minute)?;
                let key = shard.jti_bucket(minute);
                let mut start = 0;
                loop {
                    let page: Vec<String> = self.eval(scripts::list_page(&key, start, SNAPSHOT_PAGE)).await?;
                    snapshot.add_bucket(minute, &page, now)?;
                    if page.len() < SNAPSHOT_PAGE {
                        break;
                    }
                    start += SNAPSHOT_PAGE;
                }
            }
        }
        Ok(snapshot.into_revocations())
    }
}

/// The Redis store. Cheap to share behind an `Arc`; dropping it stops its
/// subscriber and closes its connections.
pub struct RedisStore {
    shared: Arc<Shared>,
    subscriber: Subscriber,
    /// The tasks watching connection events.
    watchers: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for RedisStore {
    // The URL may hold a password: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("channel", &self.shared.layout.channel()).finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to Redis and subscribes to the revocation channel.
    ///
    /// Waits up to the command timeout for the first connection; if Redis is
    /// down (or refuses the credentials) it still returns the store, which
    /// logs why, keeps reconnecting in the background and answers
    /// [`StoreError::Unavailable`] (and fails [`Store::ping`]) until Redis is
    /// back. Fails only on a URL `fred` cannot parse, which configuration
    /// validation already refuses.
    pub async fn connect(config: &RedisConfig) -> Result<Self, StoreError> {
        let timeout = Duration::from_millis(config.command_timeout_ms.max(1));
        let url = redact_url(&config.url);
        let mut redis_config = Config::from_url(&config.url)
            .map_err(|e| StoreError::Unavailable(format!("invalid Redis URL {url}: {}", e.details())))?;
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
                // A connection whose server became a replica (a failover
                // that kept the socket open) answers every write READONLY:
                // drop it and reconnect, which asks the sentinels (or the
                // cluster) for the current primary.
                conn.reconnect_errors = vec![
                    ReconnectError::ReadOnly,
                    ReconnectError::MasterDown,
                    ReconnectError::ClusterDown,
                    ReconnectError::Loading,
                ];
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2));
        let pool_size = config.pool_size.max(1);
        let pool = builder.build_pool(pool_size).map_err(map_error)?;
        let durable_pool_size = config.durable_connections();
        let durable_pool =
            (durable_pool_size > 0).then(|| builder.build_pool(durable_pool_size)).transpose().map_err(map_error)?;

        let shared = Arc::new(Shared {
            pool,
            durable_pool,
            layout: config.key_layout(),
            claimed: AtomicBool::new(false),
            marker_durable: AtomicBool::new(false),
            timeout,
            durability: Durability { replicas: config.min_replicas_acked, timeout_ms: config.replica_ack_timeout_ms },
            url,
            connect_error: std::sync::Mutex::new(None),
        });
        // Watch before connecting, so the first failure is not missed.
        let mut watchers: Vec<_> = shared.clients().map(|c| shared.watch(c)).collect();
        // It spawns its connection tasks; the handle is not needed.
        drop(shared.pool.connect());
        if let Some(durable) = &shared.durable_pool {
            drop(durable.connect());
        }
        let ping_every = Duration::from_millis(config.subscriber_ping_ms.max(1));
        let subscriber = Subscriber::start(&builder, Arc::clone(&shared), ping_every, |client| {
            watchers.push(shared.watch(client));
        })?;

        let ready = async {
            let _ = shared.pool.wait_for_connect().await;
            if let Some(durable) = &shared.durable_pool {
                let _ = durable.wait_for_connect().await;
            }
            subscriber.subscribed().await;
        };
        let connected = tokio::time::timeout(timeout, ready).await.is_ok();
        let store = Self { shared, subscriber, watchers };
        let url = &store.shared.url;
        if !connected {
            let error = store.shared.connect_error().unwrap_or_else(|| {
                format!("no connection within redis.command_timeout_ms ({} ms)", timeout.as_millis())
            });
            tracing::warn!(
                %url,
                %error,
                prefix = %config.prefix,
                "redis not reachable yet; the store reconnects in the background"
            );
            return Ok(store);
        }
        // Another layout's marker (or, without a marker, its keys) refuses
        // the start. Should the claim fail otherwise, it is made again
        // before the first command; one not yet on enough replicas, by
        // every readiness check (see `marker`).
        match store.shared.claim_layout().await {
            Err(e @ (StoreError::LayoutMismatch { .. } | StoreError::UnmarkedLayout { .. })) => return Err(e),
            Err(e @ StoreError::NotDurable { .. }) => tracing::warn!(
                %url,
                error = %e,
                "redis layout marker claimed on the primary but not yet on enough replicas; not ready until it is"
            ),
            Err(e) => {
                tracing::warn!(%url, error = %e, "redis layout marker not checked yet; checked before the first command")
            }
            Ok(()) => {}
        }
        let layout = store.shared.layout.name();
        tracing::info!(%url, prefix = %config.prefix, layout, pool_size, durable_pool_size, "redis store connected");
        Ok(store)
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        for watcher in &self.watchers {
            watcher.abort();
        }
        // The subscriber closes its own connection when dropped.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let pool = self.shared.pool.clone();
            let durable = self.shared.durable_pool.clone();
            handle.spawn(async move {
                let _ = pool.quit().await;
                if let Some(durable) = durable {
                    let _ = durable.quit().await;
                }
            });
        }
    }
}

impl RedisStore {
    /// What a sharded layout checks and writes after the commit script, in
    /// other slots: the session of a rotated token (in its own deny shard),
    /// and a reused family's entry in its deny shard, for snapshots.
    async fn after_commit(
        &self,
        commit: &RefreshCommit<'_>,
        outcome: ConsumeOutcome,
        reply: &[String],
        now: u64,
    ) -> Result<ConsumeOutcome, StoreError> {
        let layout = &self.shared.layout;

        match &outcome {
            // The session is checked after the spend when it lives in
            // another slot: a logout acknowledged before this commit began
            // is seen here, and the new pair is refused (its successor is
            // stored but dead: every commit checks the session).
            ConsumeOutcome::Rotated(record) | ConsumeOutcome::Retried(record)
                if layout.refresh_guards(commit.digest).session.is_none() =>
            {
                let set = layout.deny_sid(&record.sid);
                let call = service_sdk::redis_layout::session_revoked(set, &record.sid, now);
                let revoked: i64 = self.shared.eval(call).await?;
                if revoked == 1 {
                    return Ok(ConsumeOutcome::Invalid);
                }
            }
            ConsumeOutcome::Reused(_) => {
                if let Some((until, family)) = parse_reuse(reply)
                    && let Some(call) = scripts::family_index(layout, family, until, now, false)
                {
                    let _: i64 = self.shared.write(call).await?;
                }
            }
            _ => {}
        }
        Ok(outcome)
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn record_issued(&self, jti: &str, token: &IssuedToken, now: u64) -> Result<(), StoreError> {
        let _: i64 = self.shared.write(scripts::issue(&self.shared.layout, jti, token, now)).await?;
        Ok(())
    }

    async fn issued(&self, jti: &str, now: u64) -> Result<Option<IssuedToken>, StoreError> {
        let value: Option<String> = self.shared.bounded(self.shared.pool.get(self.shared.layout.issued(jti))).await?;
        let Some(value) = value else { return Ok(None) };
        let token = parse_issued(&value)?;
        Ok(token.filter(|t| t.exp > now))
    }

    async fn is_revoked(&self, jti: &str, sid: Option<&str>, now: u64) -> Result<bool, StoreError> {
        let calls = scripts::is_revoked(&self.shared.layout, jti, sid, now);
        self.shared.bounded(service_sdk::redis_layout::run_is_revoked(calls, &self.shared.pool)).await
    }

    async fn revoke(&self, revocation: Revocation, now: u64) -> Result<(), StoreError> {
        // In order: a family's own deny entry before the shard entry that
        // publishes it (one call for everything else).
        for call in scripts::revoke(&self.shared.layout, &revocation, now) {
            let _: i64 = self.shared.write(call).await?;
        }
        Ok(())
    }

    async fn put_refresh(&self, digest: &str, record: &RefreshRecord, now: u64) -> Result<(), StoreError> {
        let layout = &self.shared.layout;
        if layout.is_sharded() && KeyLayout::refresh_family(digest) != Some(record.family.as_str()) {
            // The family's slot is found from the digest alone.
            return Err(StoreError::Corrupt("refresh digest does not name its family".into()));
        }
        let _: i64 = self.shared.write(scripts::put_refresh(layout, digest, record, now)?).await?;
        Ok(())
    }

    async fn refresh_record(&self, digest: &str, now: u64) -> Result<Option<RefreshRecord>, StoreError> {
        if self.shared.layout.is_sharded() && KeyLayout::refresh_family(digest).is_none() {
            return Ok(None);
        }
        let fields: Vec<Option<String>> = self
            .shared
            .bounded(self.shared.pool.hmget(self.shared.layout.refresh(digest), REFRESH_FIELDS.to_vec()))
            .await?;
        Ok(parse_refresh_fields(fields)?.filter(|r| r.expires_at > now))
    }

    async fn commit_refresh(&self, commit: &RefreshCommit<'_>, now: u64) -> Result<ConsumeOutcome, StoreError> {
        let layout = &self.shared.layout;
        if layout.is_sharded() {
            if KeyLayout::refresh_family(commit.digest).is_none() {
                // Not a digest of this layout: no such token.
                return Ok(ConsumeOutcome::Invalid);
            }
            if KeyLayout::refresh_family(commit.next_digest) != KeyLayout::refresh_family(commit.digest) {
                return Err(StoreError::Corrupt("refresh successor outside its family".into()));
            }
        }
        let reply: Vec<String> = self.shared.write(scripts::commit(layout, commit, now)).await?;
        let mut outcome = parse_commit_reply(&reply)?;
        outcome = self.after_commit(commit, outcome, &reply, now).await?;
        // A registry entry outside the refresh token's slot is written
        // after the commit, from the record it returns: a rotation is never
        // acknowledged without its record. Should that write fail, the
        // rotation is undone, so the client's retry is a plain refresh.
        let apart = commit.issued_exp.filter(|_| !scripts::registry_in_commit(layout));
        if let (Some(exp), ConsumeOutcome::Rotated(record) | ConsumeOutcome::Retried(record), Some(committed)) =
            (apart, &outcome, outcome.committed())
        {
            let token = IssuedToken { sub: record.sub.clone(), sid: Some(record.sid.clone()), exp };
            if let Err(e) = self.shared.write::<i64>(scripts::issue(layout, commit.jti, &token, now)).await {
                if let Err(undo) = self.undo_refresh(commit, committed, now).await {
                    tracing::error!(error = %undo, "refresh commit not undone after its registry write failed");
                }
                return Err(e);
            }
        }
        Ok(outcome)
    }

    async fn undo_refresh(
        &self,
        commit: &RefreshCommit<'_>,
        committed: Committed,
        _now: u64,
    ) -> Result<bool, StoreError> {
        let layout = &self.shared.layout;
        if layout.is_sharded() && KeyLayout::refresh_family(commit.digest).is_none() {
            return Ok(false);
        }
        let restored: i64 = self.shared.write(scripts::undo(layout, commit, committed)).await?;
        if commit.issued_exp.is_some() && !scripts::registry_in_commit(layout) {
            let _: i64 = self.shared.bounded(self.shared.pool.del(layout.issued(commit.jti))).await?;
        }
        Ok(restored == 1)
    }

    async fn revoke_refresh(
        &self,
        revoke: &RefreshRevoke<'_>,
        now: u64,
    ) -> Result<Option<(RefreshRecord, Revocation)>, StoreError> {
        let layout = &self.shared.layout;
        if layout.is_sharded() && KeyLayout::refresh_family(revoke.digest).is_none() {
            return Ok(None);
        }
        let Some((call, writes)) = scripts::revoke_refresh(layout, revoke, now) else {
            return Err(StoreError::Corrupt("a refresh token revokes its family or session, not a jti".into()));
        };
        // One script in the token's slot; with a durable-write setting, a
        // write waits for its replicas there.
        let reply: Vec<String> = if writes { self.shared.write(call).await? } else { self.shared.eval(call).await? };
        let Some((until, record)) = parse_revoke_refresh_reply(&reply)? else { return Ok(None) };
        let revocation = revoke.revocation(&record);
        if revocation.expires_at != until {
            return Err(StoreError::Corrupt("refresh revocation wrote another deny-until".into()));
        }
        if !writes {
            // The sharded layout's session lives in its own deny shard: a
            // second script there writes and publishes it.
            for call in scripts::revoke(layout, &revocation, now) {
                let _: i64 = self.shared.write(call).await?;
            }
        } else if revocation.kind == RevocationKind::Family
            && let Some(call) = scripts::family_index(layout, &revocation.id, until, now, true)
        {
            // The sharded layout's family entry in its deny shard, for
            // snapshots, which publishes it: should it fail, nothing is
            // published, the RPC fails and its retry writes both again.
            let _: i64 = self.shared.write(call).await?;
        }
        Ok(Some((record, revocation)))
    }

    async fn revoked_snapshot(&self, now: u64) -> Result<Vec<Revocation>, StoreError> {
        self.shared.snapshot(now).await
    }

    fn subscribe(&self) -> broadcast::Receiver<Revocation> {
        self.subscriber.subscribe()
    }

    fn feed_state(&self) -> watch::Receiver<FeedState> {
        self.subscriber.feed_state()
    }

    async fn deny_list_size(&self, now: u64) -> Result<Option<DenyListSize>, StoreError> {
        let mut size = DenyListSize::default();
        for shard in self.shared.layout.deny_shards() {
            let reply: Vec<String> = self.shared.eval(scripts::deny_counts(shard, now)).await?;
            let [sid, family, minutes @ ..] = reply.as_slice() else {
                return Err(StoreError::Corrupt("deny-list count reply unreadable".into()));
            };
            size.sid += parse_score(sid)?;
            size.family += parse_score(family)?;
            let minutes = minutes.iter().map(|m| parse_score(m)).collect::<Result<Vec<u64>, _>>()?;
            if !minutes.is_empty() {
                let jti: u64 = self.shared.eval(scripts::bucket_lengths(shard, &minutes)).await?;
                size.jti += jti;
            }
        }
        Ok(Some(size))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // Every pooled connection, not just one: commands are never retried,
        // so "ready" must mean the next command lands on a live connection,
        // whichever connection the pool picks.
        for client in self.shared.pool.clients() {
            let _: String = self.shared.bounded(client.ping(None)).await?;
        }
        // The durable writes' connections may be waiting for replicas
        // (`WAIT`), which a PING would queue behind: their state is
        // enough (a write that finds one broken fails on its own).
        if let Some(durable) = &self.shared.durable_pool
            && !durable.clients().iter().all(ClientLike::is_connected)
        {
            return Err(self
                .shared
                .with_cause(StoreError::Unavailable("redis durable-write connection not connected".into())));
        }
        // The marker is still this layout's (and is written again if a
        // failover or a flush lost it), on enough replicas.
        self.shared.claim_layout().await?;
        // Answering is not enough: a full (OOM), read-only or MISCONF Redis
        // answers PING and refuses every write.
        self.shared.probe_write().await?;
        if !self.subscriber.is_live() {
            return Err(StoreError::Unavailable("redis revocation subscriber not live".into()));
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

/// Redis error codes of server states whose message is a fixed text (no
/// keys or arguments), shown in full.
const SERVER_STATES: [&str; 11] = [
    "OOM",
    "READONLY",
    "MISCONF",
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "NOREPLICAS",
    "NOAUTH",
    "WRONGPASS",
    "NOPERM",
    "CLUSTERDOWN",
];

/// The codes of a Redis that answers but refuses writes: out of memory
/// under `maxmemory-policy noeviction`, a read-only replica, a failed
/// snapshot (`stop-writes-on-bgsave-error`), too few replicas
/// (`min-replicas-to-write`).
const WRITE_REFUSALS: [&str; 4] = ["OOM", "READONLY", "MISCONF", "NOREPLICAS"];

/// The first word of an error reply (Redis's error code).
fn reply_code(e: &RedisError) -> &str {
    e.details().split_whitespace().next().unwrap_or("")
}

/// A fred error as logs show it: a fixed server-state reply in full (`OOM
/// command not allowed when used memory > 'maxmemory'.`); otherwise fred's
/// kind and, for connection-level errors (I/O, DNS, TLS, authentication,
/// configuration), its message, else only Redis's error code.
fn describe(e: &RedisError) -> String {
    let details = e.details().trim();
    let code = reply_code(e);
    if SERVER_STATES.contains(&code) {
        return details.to_owned();
    }
    let kind = e.kind();
    let whole = matches!(
        kind,
        ErrorKind::IO | ErrorKind::Auth | ErrorKind::Tls | ErrorKind::Config | ErrorKind::Url | ErrorKind::Timeout
    );
    let shown = match (whole, kind) {
        (true, ErrorKind::IO) => io_message(details),
        (true, _) => details,
        (false, _) => code,
    };
    format!("{kind:?}: {shown}").trim_end_matches([':', ' ']).to_owned()
}

/// The message of an I/O error fred shows in its `Debug` form
/// (`Os { code: 111, kind: ConnectionRefused, message: "Connection refused" }`,
/// `Custom { kind: Uncategorized, error: "failed to lookup address ..." }`).
fn io_message(details: &str) -> &str {
    ["message: \"", "error: \""]
        .iter()
        .find_map(|field| details.split_once(field).and_then(|(_, rest)| rest.split_once('"')).map(|(m, _)| m))
        .unwrap_or(details)
}

/// Maps a fred error to a store error. The text names the error class, and
/// Redis's error code or a fixed message ([`describe`]), never keys or
/// arguments.
fn map_error(e: RedisError) -> StoreError {
    let code = e.details().split_whitespace().next().unwrap_or("").to_owned();
    match e.kind() {
        ErrorKind::InvalidArgument | ErrorKind::Parse | ErrorKind::Protocol => {
            StoreError::Corrupt(format!("redis replied {:?} {code}", e.kind()))
        }
        ErrorKind::Unknown if code == "ERR" => StoreError::Corrupt("redis script failed".into()),
        // IO, timeouts, cancellation, TLS, auth, cluster and server states
        // such as LOADING, MISCONF, OOM, READONLY, BUSY.
        _ => StoreError::Unavailable(format!("redis {}", describe(&e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_show_connection_causes_and_server_states_but_not_arguments() {
        let e = RedisError::new(
            ErrorKind::IO,
            "Os { code: 111, kind: ConnectionRefused, message: \"Connection refused\" }",
        );
        assert_eq!(describe(&e), "IO: Connection refused");
        let e = RedisError::new(
            ErrorKind::IO,
            "Custom { kind: Uncategorized, error: \"failed to lookup address information: Name or service not known\" }",
        );
        assert_eq!(describe(&e), "IO: failed to lookup address information: Name or service not known");
        let e = RedisError::new(ErrorKind::IO, "Broken pipe");
        assert_eq!(describe(&e), "IO: Broken pipe");
        let e = RedisError::new(ErrorKind::Auth, "WRONGPASS invalid username-password pair or user is disabled.");
        assert!(describe(&e).contains("WRONGPASS invalid username-password pair"), "{}", describe(&e));
        let e = RedisError::new(ErrorKind::Unknown, "OOM command not allowed when used memory > 'maxmemory'.");
        assert_eq!(describe(&e), "OOM command not allowed when used memory > 'maxmemory'.");
        let StoreError::Unavailable(text) = map_error(e) else { panic!("OOM is an outage") };
        assert_eq!(text, "redis OOM command not allowed when used memory > 'maxmemory'.");
        // A reply that may echo keys or arguments shows its code only.
        let e = RedisError::new(ErrorKind::Cluster, "MOVED 3999 10.0.0.7:6381 secret-key");
        assert_eq!(describe(&e), "Cluster: MOVED");
    }
}
