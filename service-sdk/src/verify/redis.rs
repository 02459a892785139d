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
//! [`ready`](RevocationCheck::ready)); until an auth server has written it
//! (on connecting to this Redis), every check fails closed, as a pushed
//! deny set does until its first snapshot. The first layout read is the
//! one this check reads for its whole life (with
//! [`RedisRevocation::connect_with_layout`], the one asked for).
//!
//! The marker is read again, since Redis can change under a running check
//! (a flush, a replaced instance, auth servers restarted with another
//! `redis.layout`): a lookup more than
//! [`MARKER_RECHECK_SECS`](RedisRevocation::MARKER_RECHECK_SECS) (of
//! verification time) after the marker last named this check's layout
//! reads it again, concurrently with its own check (one `GET`, no extra
//! round trip of latency), and its answer stands only if the marker still
//! names the layout. So within that bound a check notices that:
//!
//! - the marker names **another layout** or a format this version does not
//!   know: every check fails closed, logged once at error level, until the
//!   marker names this check's layout again. A check never follows a new
//!   layout by itself (the old layout's revocations would go unseen):
//!   restart the service to read the new one.
//! - the marker is **absent** (a flush, or a failover that lost it; the
//!   auth servers write it back at their next readiness check): checks go
//!   on reading the layout for up to
//!   [`MARKER_ABSENT_GRACE_SECS`](RedisRevocation::MARKER_ABSENT_GRACE_SECS)
//!   after the marker last named it, then fail closed until it is back.
//! - the marker **cannot be read**: that lookup fails closed, as any Redis
//!   failure does.
//!
//! Each change of what the marker says is logged once.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fred::prelude::{Builder, ClientLike as _, Config, KeysInterface as _, Pool, ReconnectPolicy};

use super::VerifyError;
use super::revocation::{RevocationCheck, RevocationLookup};
use crate::redis_layout::{self, KeyLayout};

/// How often [`ready`](RevocationCheck::ready) repeats, while it waits for
/// the layout marker, what it waits for.
const READY_LOG_EVERY: Duration = Duration::from_secs(30);

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
    /// What the layout marker said.
    marker: Mutex<MarkerState>,
    timeout: Duration,
    connection: tokio::task::JoinHandle<Result<(), fred::error::Error>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// The layout this check reads and what the marker said of it.
struct MarkerState {
    /// The layout checks read: the one asked for, or the first one the
    /// marker named. Never changes once set.
    layout: Option<Arc<KeyLayout>>,
    /// When (verification time, Unix seconds) the marker last named
    /// `layout`; `None` before that, and once it named another.
    confirmed: Option<u64>,
    /// What the last read found, so that each change is logged once.
    seen: Seen,
}

/// What a marker read found, as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// Not read yet.
    Nothing,
    /// It names this check's layout.
    Layout,
    /// Absent; the layout it last named is still read.
    MissingTolerated,
    /// Absent, and no layout is read.
    Missing,
    /// Unreadable (Redis did not answer in time).
    Unavailable(String),
    /// Another format, or not a marker.
    Unknown(String),
    /// Another layout than this check's.
    Other(&'static str),
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
    /// How long a read of the layout marker stands, in seconds of
    /// verification time: a lookup later than this after the marker last
    /// named this check's layout reads it again (see `docs/REDIS.md`,
    /// "Key layout", on the layout marker).
    pub const MARKER_RECHECK_SECS: u64 = 5;

    /// How long, in seconds after the marker last named this check's
    /// layout, checks go on reading it while the marker is absent; then
    /// they fail closed until it is back.
    pub const MARKER_ABSENT_GRACE_SECS: u64 = 30;

    /// Connects (in the background, reconnecting as needed) to the auth
    /// server's Redis at `url` (`redis://`, `rediss://`,
    /// `redis-sentinel://` or `redis-cluster://`), with key prefix `prefix`
    /// (the auth server's `redis.prefix`, default `auth`) and a per-lookup
    /// `timeout`. The key layout is the one the auth server recorded in
    /// the layout marker ([`KeyLayout::marker`]); checks fail closed
    /// until it is there, and whenever it names another layout later (see
    /// `docs/REDIS.md`, "Key layout", on the layout marker). Must be
    /// called within a tokio runtime.
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
        let marker = MarkerState { layout: expected.map(Arc::new), confirmed: None, seen: Seen::Nothing };
        let shared = Shared { pool, prefix: prefix.to_owned(), marker: Mutex::new(marker), timeout, connection };
        Ok(Self { shared: Arc::new(shared) })
    }
}

/// Why the layout marker gives no layout to read.
#[derive(Debug, thiserror::Error)]
enum MarkerError {
    /// Redis did not answer (in time).
    #[error("layout marker unreadable: {0}")]
    Unavailable(String),
    /// No auth server has written it to this Redis with this prefix (yet,
    /// or again after a flush, for longer than the grace).
    #[error("no layout marker")]
    Missing,
    /// A layout or format this version does not know.
    #[error(transparent)]
    Unknown(redis_layout::UnknownMarker),
    /// Another layout than the one this check reads.
    #[error("the layout marker names the {found} layout, this check reads the {expected} layout")]
    Other { expected: &'static str, found: &'static str },
}

impl MarkerError {
    /// What [`ready`](RevocationCheck::ready) waits for, for its log.
    fn waiting_for(&self) -> &'static str {
        match self {
            Self::Unavailable(_) => "Redis to answer the layout marker read",
            Self::Missing => "an auth server to write the layout marker (it does when it connects to this Redis)",
            Self::Unknown(_) => "the layout marker to name a layout this version knows (it never does by itself)",
            Self::Other { .. } => {
                "the layout marker to name this check's layout again (it never does by itself: restart this service \
                 or fix redis.layout)"
            }
        }
    }
}

/// The current time as verification time (Unix seconds).
fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl MarkerState {
    /// The layout to read at `now`, and whether the marker named it
    /// recently enough that it need not be read again.
    fn current(&self, now: u64) -> (Option<Arc<KeyLayout>>, bool) {
        let fresh = self.confirmed.is_some_and(|at| at <= now && now - at < RedisRevocation::MARKER_RECHECK_SECS);
        (self.layout.clone(), fresh)
    }

    /// What a marker read at `now` means: the layout to read, or why there
    /// is none; and what to log.
    fn judge(
        &mut self,
        prefix: &str,
        read: Result<Option<String>, String>,
        now: u64,
    ) -> (Result<Arc<KeyLayout>, MarkerError>, Seen) {
        let value = match read {
            Ok(Some(value)) => value,
            Ok(None) => {
                return match (&self.layout, self.confirmed) {
                    (Some(layout), Some(at)) if at <= now && now - at < RedisRevocation::MARKER_ABSENT_GRACE_SECS => {
                        (Ok(Arc::clone(layout)), Seen::MissingTolerated)
                    }
                    _ => (Err(MarkerError::Missing), Seen::Missing),
                };
            }
            Err(cause) => return (Err(MarkerError::Unavailable(cause.clone())), Seen::Unavailable(cause)),
        };
        if let Some(layout) = &self.layout
            && value == layout.marker_value()
        {
            self.confirmed = Some(now);
            return (Ok(Arc::clone(layout)), Seen::Layout);
        }
        match KeyLayout::from_marker(prefix, &value) {
            Err(unknown) => {
                self.confirmed = None;
                let seen = Seen::Unknown(unknown.value.clone());
                (Err(MarkerError::Unknown(unknown)), seen)
            }
            Ok(found) => match &self.layout {
                Some(layout) => {
                    self.confirmed = None;
                    let error = MarkerError::Other { expected: layout.name(), found: found.name() };
                    (Err(error), Seen::Other(found.name()))
                }
                None => {
                    let layout = Arc::new(found);
                    self.layout = Some(Arc::clone(&layout));
                    self.confirmed = Some(now);
                    (Ok(layout), Seen::Layout)
                }
            },
        }
    }
}

impl Shared {
    fn marker(&self) -> std::sync::MutexGuard<'_, MarkerState> {
        self.marker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One read of the marker, bounded by the timeout.
    async fn read_marker(&self) -> Result<Option<String>, String> {
        let key = KeyLayout::marker_key(&self.prefix);
        match tokio::time::timeout(self.timeout, self.pool.get::<Option<String>, _>(key)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(format!("{:?}", e.kind())),
            Err(_) => Err("timed out".into()),
        }
    }

    /// Judges a marker read at `now` (see [`MarkerState::judge`]), logging
    /// what changed.
    fn judge(&self, read: Result<Option<String>, String>, now: u64) -> Result<Arc<KeyLayout>, MarkerError> {
        let mut state = self.marker();
        let (verdict, seen) = state.judge(&self.prefix, read, now);
        if seen != state.seen {
            let before = std::mem::replace(&mut state.seen, seen.clone());
            let layout = state.layout.as_ref().map(|l| l.name());
            drop(state);
            self.log_change(&before, &seen, layout, &verdict);
        }
        verdict
    }

    fn log_change(
        &self,
        before: &Seen,
        now: &Seen,
        layout: Option<&str>,
        verdict: &Result<Arc<KeyLayout>, MarkerError>,
    ) {
        let prefix = &self.prefix;
        match (now, verdict) {
            (Seen::Layout, _) if *before == Seen::Nothing => {
                tracing::info!(%prefix, layout, "redis layout marker read");
            }
            (Seen::Layout, _) => tracing::info!(%prefix, layout, "redis layout marker names this check's layout again"),
            (Seen::MissingTolerated, _) => tracing::warn!(
                %prefix,
                layout,
                grace_secs = RedisRevocation::MARKER_ABSENT_GRACE_SECS,
                "redis layout marker missing (a flush or a failover?); reading the layout it last named until the \
                 grace runs out, then refusing"
            ),
            (Seen::Missing, _) => tracing::warn!(
                %prefix,
                "no redis layout marker (no auth server has written it to this Redis with this prefix); refusing"
            ),
            (Seen::Unavailable(cause), _) => {
                tracing::warn!(%prefix, %cause, "redis layout marker unreadable; refusing")
            }
            (_, Err(e @ MarkerError::Unknown(_))) => tracing::error!(%prefix, error = %e, "refusing"),
            (_, Err(MarkerError::Other { expected, found })) => tracing::error!(
                %prefix,
                expected,
                found,
                "the redis layout marker names another key layout than this check reads; refusing until it names \
                 this one again (restart the service to follow a new layout)"
            ),
            _ => {}
        }
    }

    /// The lookup's own round trip, bounded by the timeout.
    async fn lookup(&self, calls: Vec<redis_layout::ScriptCall<'static>>) -> Result<bool, VerifyError> {
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

    async fn is_revoked(&self, jti: &str, sid: Option<&str>, now: u64) -> Result<bool, VerifyError> {
        let (layout, fresh) = self.marker().current(now);
        let refused = |_| VerifyError::RevocationUnavailable;
        match layout {
            Some(layout) if fresh => self.lookup(redis_layout::is_revoked(&layout, jti, sid, now)).await,
            // The marker is read again alongside the lookup, which stands
            // only if the marker still names the layout it read.
            Some(layout) => {
                let calls = redis_layout::is_revoked(&layout, jti, sid, now);
                let (read, answer) = tokio::join!(self.read_marker(), self.lookup(calls));
                self.judge(read, now).map_err(refused)?;
                answer
            }
            None => {
                let read = self.read_marker().await;
                let layout = self.judge(read, now).map_err(refused)?;
                self.lookup(redis_layout::is_revoked(&layout, jti, sid, now)).await
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

    /// Waits until the layout marker names a layout this check reads: as
    /// long as it takes an auth server to write it, and forever while it
    /// names another layout (which never resolves by itself: logged at
    /// error level, and again every 30 s while it waits, saying for what).
    fn ready(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let shared = &self.shared;
            if shared.marker().current(unix_now()).1 {
                return;
            }
            if let Err(e) = shared.pool.wait_for_connect().await {
                tracing::warn!(kind = ?e.kind(), "redis not connected");
            }
            let mut pause = Duration::from_millis(20);
            let mut told = Instant::now();
            loop {
                let now = unix_now();
                let read = shared.read_marker().await;
                let Err(e) = shared.judge(read, now) else { return };
                if told.elapsed() >= READY_LOG_EVERY {
                    told = Instant::now();
                    let waiting_for = e.waiting_for();
                    match e {
                        MarkerError::Unknown(_) | MarkerError::Other { .. } => {
                            tracing::error!(prefix = %shared.prefix, error = %e, "redis revocation not ready: waiting for {waiting_for}")
                        }
                        MarkerError::Unavailable(_) | MarkerError::Missing => {
                            tracing::warn!(prefix = %shared.prefix, error = %e, "redis revocation not ready: waiting for {waiting_for}")
                        }
                    }
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        })
    }
}
