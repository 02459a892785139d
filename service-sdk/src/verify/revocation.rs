//! Revocation: is this token's `jti` or `sid` on the deny list?
//!
//! [`RevocationCheck`] is the port; [`RevocationFeed`] (the default, push
//! mode) keeps a `WatchRevocations` stream open and answers from a local
//! deny set, so the per-request check is a memory lookup. With the `redis`
//! feature, `RedisRevocation` asks Redis on every request instead.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::{self as pb, WatchRevocationsRequest, revocation_event::Event};
use tokio::sync::{broadcast, watch};
use tonic::transport::Channel;

use super::observe::{FeedHealth, FeedStats, VerifyEvent, VerifyObserver};
use super::{MAX_LEEWAY_SECS, VerifyError};
use crate::Clock;
use crate::backoff::Backoff;

/// What a revocation names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RevokedKind {
    /// One access token, by `jti`.
    Jti,
    /// A login session, by `sid`: every token carrying it.
    Sid,
}

/// One revoked id, as announced to the verified-token cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevokedId {
    /// What `id` names.
    pub kind: RevokedKind,
    /// The `jti` or `sid`.
    pub id: String,
}

/// A boxed future answering one revocation lookup.
pub type LookupFuture = Pin<Box<dyn Future<Output = Result<(), VerifyError>> + Send + 'static>>;

/// The answer of [`RevocationCheck::check`]: at once (a memory lookup) or
/// after I/O (a Redis round trip).
pub enum RevocationLookup {
    /// `Ok(())` when not revoked; `Err(Revoked)`, or an unavailability error
    /// when the check cannot be trusted (fail closed).
    Ready(Result<(), VerifyError>),
    /// The lookup needs I/O.
    Pending(LookupFuture),
}

impl std::fmt::Debug for RevocationLookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RevocationLookup::Ready(r) => f.debug_tuple("Ready").field(r).finish(),
            RevocationLookup::Pending(_) => f.write_str("Pending"),
        }
    }
}

/// The revocation port of a [`Verifier`](super::Verifier).
pub trait RevocationCheck: Send + Sync + 'static {
    /// Whether the token with this `jti` (and `sid`, if any) may be used at
    /// `now` (Unix seconds). Must fail closed: when the answer cannot be
    /// trusted, return an error for which
    /// [`VerifyError::is_unavailable`] holds.
    fn check(&self, jti: &str, sid: Option<&str>, now: u64) -> RevocationLookup;

    /// A stream of revocations as they happen, so cached verifications can
    /// be evicted. `None` when the implementation has no push channel.
    fn subscribe(&self) -> Option<broadcast::Receiver<RevokedId>> {
        None
    }

    /// Resolves once the check can answer (e.g. the feed's first snapshot
    /// has arrived).
    fn ready(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(std::future::ready(()))
    }

    /// Where to report this check's own events (a feed's connection,
    /// snapshots and staleness): the verifier it is built into calls this
    /// once, from `build`. The default reports nothing.
    fn report_to(&self, observer: Arc<dyn VerifyObserver>) {
        let _ = observer;
    }

    /// The state of this check's push feed, for
    /// [`Verifier::stats`](super::Verifier::stats). `None` (the default)
    /// when it has no feed, e.g. a per-request Redis lookup.
    fn feed_stats(&self) -> Option<FeedStats> {
        None
    }
}

/// Timing and stale policy of a [`RevocationFeed`]. Checked by
/// [`FeedOptions::validate`], which every constructor of the feed calls
/// ([`RevocationFeed::connect`], [`RevocationFeed::detached`], and
/// [`VerifierBuilder::build`](super::VerifierBuilder::build) for its
/// default feed): options that fail it are never used.
#[derive(Clone, Debug)]
pub struct FeedOptions {
    /// How long the feed may be silent (no snapshot, event or heartbeat)
    /// before it is stale (default 30 s; whole seconds, 1 s to
    /// [`FeedOptions::MAX_STALE_AFTER`]). What a stale feed answers is
    /// [`FeedOptions::on_stale`].
    pub stale_after: Duration,
    /// What checks answer once the feed is stale (default
    /// [`StalePolicy::FailClosed`]).
    pub on_stale: StalePolicy,
    /// First reconnect delay (default 100 ms, above zero); doubles up to
    /// [`FeedOptions::max_backoff`].
    pub initial_backoff: Duration,
    /// Longest reconnect delay (default 5 s; at most `stale_after`, so a
    /// lost stream is retried within every stale bound).
    pub max_backoff: Duration,
}

/// What a [`RevocationFeed`] answers once it has been silent for longer
/// than [`FeedOptions::stale_after`].
///
/// A verifier cannot tell a partition (its auth server replica lost Redis,
/// or it lost the auth server) from a full Redis outage: both end in
/// silence. Failing closed is safe but stops service-to-service traffic
/// once the bound passes; serving the last known deny set keeps traffic
/// going for a while but does not see revocations made meanwhile. Either
/// way ids already known to be revoked are refused, expired tokens are
/// refused by the validator, and nothing is answered before the first
/// complete snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StalePolicy {
    /// Every check fails closed with [`VerifyError::FeedStale`] (the
    /// default): the service answers `UNAVAILABLE` until the feed is heard
    /// from again.
    #[default]
    FailClosed,
    /// Keep answering from the last known deny set for at most `up_to`
    /// past the stale bound (1 s to [`FeedOptions::MAX_SERVE_STALE`], whole
    /// seconds), then fail closed. Each such answer is reported
    /// ([`VerifyEvent::ServedStale`], [`FeedStats::served_stale`]) and each
    /// stale episode logged once as a warning.
    ServeLastKnown {
        /// How long past `stale_after` the last known set is used.
        up_to: Duration,
    },
}

/// Why [`FeedOptions`] were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FeedOptionsError {
    /// `stale_after` is under 1 s or over [`FeedOptions::MAX_STALE_AFTER`].
    #[error("feed stale_after must be between 1 s and 600 s")]
    StaleAfter,
    /// `ServeLastKnown { up_to }` is under 1 s or over
    /// [`FeedOptions::MAX_SERVE_STALE`].
    #[error("feed on_stale ServeLastKnown up_to must be between 1 s and 3600 s")]
    ServeUpTo,
    /// `initial_backoff` is zero, or `max_backoff` exceeds `stale_after`.
    #[error("feed initial_backoff must be above zero and max_backoff at most stale_after")]
    Backoff,
}

impl FeedOptions {
    /// The longest [`FeedOptions::stale_after`] accepted: a longer silence
    /// would leave revocations unseen for longer than most tokens live.
    pub const MAX_STALE_AFTER: Duration = Duration::from_secs(600);
    /// The longest `up_to` of [`StalePolicy::ServeLastKnown`] accepted.
    pub const MAX_SERVE_STALE: Duration = Duration::from_secs(3_600);

    /// Whether these options make sense. Every feed constructor refuses
    /// them otherwise: [`RevocationFeed::connect`] and
    /// [`RevocationFeed::detached`] with this error, the verifier builder
    /// with [`BuildError::FeedOptions`](super::BuildError::FeedOptions).
    pub fn validate(&self) -> Result<(), FeedOptionsError> {
        if self.stale_after.as_secs() == 0 || self.stale_after > Self::MAX_STALE_AFTER {
            return Err(FeedOptionsError::StaleAfter);
        }
        if let StalePolicy::ServeLastKnown { up_to } = self.on_stale
            && (up_to.as_secs() == 0 || up_to > Self::MAX_SERVE_STALE)
        {
            return Err(FeedOptionsError::ServeUpTo);
        }
        if self.initial_backoff.is_zero() || self.max_backoff > self.stale_after {
            return Err(FeedOptionsError::Backoff);
        }
        Ok(())
    }
}

impl Default for FeedOptions {
    fn default() -> Self {
        Self {
            stale_after: Duration::from_secs(30),
            on_stale: StalePolicy::FailClosed,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

#[derive(Default)]
struct DenySet {
    /// jti → when the entry may be forgotten.
    jti: HashMap<String, u64>,
    /// sid → when the entry may be forgotten.
    sid: HashMap<String, u64>,
    next_prune: u64,
}

impl DenySet {
    /// Inserts; returns whether the id is new.
    fn insert(&mut self, kind: RevokedKind, id: &str, expires_at: u64) -> bool {
        let map = match kind {
            RevokedKind::Jti => &mut self.jti,
            RevokedKind::Sid => &mut self.sid,
        };
        match map.get_mut(id) {
            Some(e) => {
                *e = (*e).max(expires_at);
                false
            }
            None => {
                map.insert(id.to_owned(), expires_at);
                true
            }
        }
    }

    fn len(&self) -> usize {
        self.jti.len() + self.sid.len()
    }

    /// Whether a token that expires at `expires_at` may still be valid at
    /// `now`, even with the largest leeway a validator allows.
    fn live(expires_at: u64, now: u64) -> bool {
        expires_at.saturating_add(MAX_LEEWAY_SECS) >= now
    }

    /// Moves in the entries of `old` that are still live, keeping the later
    /// expiry of an id held by both: a new snapshot never lifts a
    /// revocation the feed already knew.
    fn carry_over(&mut self, old: DenySet, now: u64) {
        for (map, old) in [(&mut self.jti, old.jti), (&mut self.sid, old.sid)] {
            map.reserve(old.len());
            for (id, expires_at) in old {
                if Self::live(expires_at, now) {
                    let e = map.entry(id).or_insert(expires_at);
                    *e = (*e).max(expires_at);
                }
            }
        }
    }

    /// The ids in `self` that `old` does not hold.
    fn added_since(&self, old: &DenySet) -> Vec<RevokedId> {
        let jti = self.jti.keys().filter(|id| !old.jti.contains_key(*id)).map(|id| (RevokedKind::Jti, id));
        let sid = self.sid.keys().filter(|id| !old.sid.contains_key(*id)).map(|id| (RevokedKind::Sid, id));
        jti.chain(sid).map(|(kind, id)| RevokedId { kind, id: id.clone() }).collect()
    }

    /// Forgets entries whose tokens cannot be valid any more, even with the
    /// largest leeway a validator allows. Runs at most every 30 s.
    fn prune(&mut self, now: u64) {
        if now < self.next_prune {
            return;
        }
        self.next_prune = now.saturating_add(30);
        let live = |_: &String, exp: &mut u64| Self::live(*exp, now);
        self.jti.retain(live);
        self.sid.retain(live);
    }
}

/// The push-mode revocation check: a local deny set of `jti`s and `sid`s,
/// kept current by a `WatchRevocations` stream (snapshot, then events and
/// heartbeats), reconnecting with backoff. A snapshot may come in chunks;
/// the feed is ready only once a snapshot's last chunk is in, and each new
/// snapshot takes effect at once with its last chunk. A revocation is never
/// lifted: ids the feed already held stay, whatever a later snapshot
/// lacks, until their tokens cannot be valid any more. Clones share one
/// feed; the stream closes when the last clone is dropped.
///
/// Before the first complete snapshot every check fails closed with
/// [`VerifyError::FeedStale`]. When nothing has been heard for longer than
/// [`FeedOptions::stale_after`], the feed is stale and answers as
/// [`FeedOptions::on_stale`] says: fail closed (the default), or for a
/// while from the last known deny set. After a reconnect the feed counts
/// as heard from only once the new stream's snapshot is complete.
///
/// A feed reports its connection, snapshots, messages and staleness to
/// the observer of the first verifier built with it (see
/// [`VerifyEvent`]); its state is in [`FeedStats`].
#[derive(Clone)]
pub struct RevocationFeed {
    state: Arc<FeedState>,
}

impl std::fmt::Debug for RevocationFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationFeed").field("revoked", &self.revoked_count()).finish_non_exhaustive()
    }
}

struct FeedState {
    deny: RwLock<DenySet>,
    /// A snapshot being received chunk by chunk; it replaces `deny` whole
    /// when its last chunk arrives.
    assembling: Mutex<Option<DenySet>>,
    /// Unix seconds of the last message on a stream whose snapshot was
    /// complete; meaningful once `synced_flag`.
    last_heard: AtomicU64,
    synced: watch::Sender<bool>,
    /// `synced`, for the check: an atomic, not a lock.
    synced_flag: AtomicBool,
    /// A new stream opened and its snapshot is not complete yet: its other
    /// messages do not count as hearing from the feed.
    awaiting_snapshot: AtomicBool,
    stale_after: u64,
    /// [`StalePolicy::ServeLastKnown`]'s `up_to` in seconds; `None` to
    /// fail closed.
    serve_up_to: Option<u64>,
    clock: Arc<dyn Clock>,
    events: broadcast::Sender<RevokedId>,
    observer: OnceLock<Arc<dyn VerifyObserver>>,
    /// How far the current silence has been reported: one of the
    /// `REPORTED_*` values, back to `REPORTED_NONE` when the feed is heard.
    reported: AtomicU8,
    /// Entries in `deny`, for stats without the lock.
    entries: AtomicUsize,
    /// Streams opened.
    connects: AtomicU64,
    /// Silences of a synced feed past its stale bound, noticed by a check.
    stale_episodes: AtomicU64,
    /// Checks answered from the last known set while stale.
    served_stale: AtomicU64,
    /// Dropped with the state, which ends the stream task.
    _stop: watch::Sender<()>,
}

/// Nothing reported about the current silence (or the feed is heard).
const REPORTED_NONE: u8 = 0;
/// [`VerifyEvent::FeedServingStale`] reported.
const REPORTED_SERVING: u8 = 1;
/// [`VerifyEvent::FeedStale`] reported.
const REPORTED_CLOSED: u8 = 2;

impl FeedState {
    fn report(&self, event: VerifyEvent<'_>) {
        if let Some(observer) = self.observer.get() {
            observer.on_event(&event);
        }
    }

    /// Where the feed stands at `now`; and for how long it has been silent
    /// (0 before the first snapshot).
    fn health_at(&self, now: u64) -> (FeedHealth, u64) {
        if !self.synced_flag.load(Ordering::Acquire) {
            return (FeedHealth::Syncing, 0);
        }
        let silent = now.saturating_sub(self.last_heard.load(Ordering::Acquire));
        let health = if silent <= self.stale_after {
            FeedHealth::Fresh
        } else {
            match self.serve_up_to {
                Some(up_to) if silent <= self.stale_after.saturating_add(up_to) => FeedHealth::ServingStale,
                _ => FeedHealth::Stale,
            }
        };
        (health, silent)
    }

    /// The answer of a check while the feed is not fresh, off the hot
    /// path; reports the first check of each phase of a silence.
    #[cold]
    #[inline(never)]
    fn stale_answer(&self, health: FeedHealth, silent: u64) -> Result<(), VerifyError> {
        if health == FeedHealth::ServingStale {
            self.enter(REPORTED_SERVING, silent);
            self.served_stale.fetch_add(1, Ordering::Relaxed);
            self.report(VerifyEvent::ServedStale);
            Ok(())
        } else {
            self.enter(REPORTED_CLOSED, silent);
            Err(VerifyError::FeedStale)
        }
    }

    /// Reports, once per silence, that it reached `phase`.
    fn enter(&self, phase: u8, silent: u64) {
        if self.reported.load(Ordering::Relaxed) >= phase {
            return;
        }
        let before = self.reported.fetch_max(phase, Ordering::Relaxed);
        if before >= phase {
            return;
        }
        let synced = self.synced_flag.load(Ordering::Acquire);
        if before == REPORTED_NONE && synced {
            self.stale_episodes.fetch_add(1, Ordering::Relaxed);
        }
        if phase == REPORTED_SERVING {
            let until = self.last_heard.load(Ordering::Acquire).saturating_add(self.stale_after);
            let until = until.saturating_add(self.serve_up_to.unwrap_or(0));
            tracing::warn!(
                silent_secs = silent,
                serve_up_to_secs = self.serve_up_to,
                "revocation feed stale: answering from the last known deny set, revocations made meanwhile are not \
                 seen"
            );
            self.report(VerifyEvent::FeedServingStale { until });
        } else {
            if synced {
                tracing::warn!(silent_secs = silent, "revocation feed stale: verifications fail closed");
            }
            self.report(VerifyEvent::FeedStale);
        }
    }

    fn stats(&self) -> FeedStats {
        let now = self.clock.now_unix();
        let (health, silent) = self.health_at(now);
        // A silence no check has come upon yet is an episode all the same.
        let unnoticed = matches!(health, FeedHealth::Stale | FeedHealth::ServingStale)
            && self.reported.load(Ordering::Relaxed) == REPORTED_NONE;
        FeedStats {
            health,
            silent_for_secs: (health != FeedHealth::Syncing).then_some(silent),
            entries: self.entries.load(Ordering::Relaxed),
            reconnects: self.connects.load(Ordering::Relaxed).saturating_sub(1),
            stale_episodes: self.stale_episodes.load(Ordering::Relaxed) + u64::from(unnoticed),
            served_stale: self.served_stale.load(Ordering::Relaxed),
        }
    }
}

impl RevocationFeed {
    /// Opens the `WatchRevocations` stream on `channel` (an mTLS channel to
    /// the auth service) and keeps it open. Must be called within a tokio
    /// runtime. Refuses options that fail [`FeedOptions::validate`].
    pub fn connect(channel: Channel, clock: Arc<dyn Clock>, opts: FeedOptions) -> Result<Self, FeedOptionsError> {
        let (feed, stopped) = Self::new(clock, &opts)?;
        tokio::spawn(watch_loop(channel, Arc::downgrade(&feed.state), stopped, opts));
        Ok(feed)
    }

    /// [`RevocationFeed::connect`], reporting to `observer` from the start.
    pub(crate) fn connect_reporting(
        channel: Channel,
        clock: Arc<dyn Clock>,
        opts: FeedOptions,
        observer: Arc<dyn VerifyObserver>,
    ) -> Result<Self, FeedOptionsError> {
        let (feed, stopped) = Self::new(clock, &opts)?;
        feed.report_to(observer);
        tokio::spawn(watch_loop(channel, Arc::downgrade(&feed.state), stopped, opts));
        Ok(feed)
    }

    /// A feed with no stream: events arrive only through
    /// [`RevocationFeed::apply`] (tests, or a service that relays
    /// revocations itself). Refuses options that fail
    /// [`FeedOptions::validate`].
    pub fn detached(clock: Arc<dyn Clock>, opts: FeedOptions) -> Result<Self, FeedOptionsError> {
        Ok(Self::new(clock, &opts)?.0)
    }

    /// The one place a feed is made: its options are checked here.
    fn new(clock: Arc<dyn Clock>, opts: &FeedOptions) -> Result<(Self, watch::Receiver<()>), FeedOptionsError> {
        opts.validate()?;
        let (stop, stopped) = watch::channel(());
        let (synced, _) = watch::channel(false);
        let serve_up_to = match opts.on_stale {
            StalePolicy::FailClosed => None,
            StalePolicy::ServeLastKnown { up_to } => Some(up_to.as_secs()),
        };
        let state = FeedState {
            deny: RwLock::new(DenySet::default()),
            assembling: Mutex::new(None),
            last_heard: AtomicU64::new(0),
            synced,
            synced_flag: AtomicBool::new(false),
            awaiting_snapshot: AtomicBool::new(false),
            stale_after: opts.stale_after.as_secs(),
            serve_up_to,
            clock,
            events: broadcast::channel(1024).0,
            observer: OnceLock::new(),
            reported: AtomicU8::new(REPORTED_NONE),
            entries: AtomicUsize::new(0),
            connects: AtomicU64::new(0),
            stale_episodes: AtomicU64::new(0),
            served_stale: AtomicU64::new(0),
            _stop: stop,
        };
        Ok((Self { state: Arc::new(state) }, stopped))
    }

    /// Applies one message of the stream.
    ///
    /// A snapshot arrives in chunks (each but the last marked `more`); the
    /// chunks are gathered aside and become the deny set at once with the
    /// last one, together with the entries of the old set whose tokens may
    /// still be valid (a revocation is never lifted: a snapshot resent on
    /// an open stream may lack ids that follow it as separate revocations).
    /// Until then nothing changes: the feed is neither
    /// synced nor heard from, so a feed that was stale stays stale until
    /// the whole snapshot is in. On a newly opened stream (see
    /// [`RevocationFeed::reconnected`]), and while a snapshot resent on an
    /// open stream is coming in, revocations are added to the set but, like
    /// heartbeats, do not count as hearing from the feed.
    pub fn apply(&self, event: pb::RevocationEvent) {
        let now = self.state.clock.now_unix();
        let mut new = Vec::new();
        let mut snapshot = None;
        match event.event {
            Some(Event::Snapshot(snap)) => {
                let mut assembling = self.state.assembling.lock().unwrap_or_else(|p| p.into_inner());
                let set = assembling.get_or_insert_with(DenySet::default);
                for r in &snap.entries {
                    if let Some(kind) = kind_of(r) {
                        set.insert(kind, &r.id, r.expires_at);
                    }
                }
                if snap.more {
                    // A snapshot resent on an open stream says the set may
                    // lack revocations: until its last chunk, nothing else
                    // on the stream counts as hearing from the feed.
                    self.state.awaiting_snapshot.store(true, Ordering::Relaxed);
                    return;
                }
                let mut complete = assembling.take().unwrap_or_default();
                drop(assembling);
                let mut deny = self.state.deny.write().unwrap_or_else(|p| p.into_inner());
                new = complete.added_since(&deny);
                complete.next_prune = deny.next_prune;
                let old = std::mem::replace(&mut *deny, complete);
                // O(old) moves under the lock, as `added_since` is O(new).
                deny.carry_over(old, now);
                deny.prune(now);
                snapshot = Some(deny.len());
                self.state.entries.store(deny.len(), Ordering::Relaxed);
                drop(deny);
                tracing::debug!(entries = snapshot, "revocation snapshot applied");
            }
            Some(Event::Revoked(r)) => {
                if let Some(kind) = kind_of(&r) {
                    if let Some(set) = self.state.assembling.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                        set.insert(kind, &r.id, r.expires_at);
                    }
                    let mut deny = self.state.deny.write().unwrap_or_else(|p| p.into_inner());
                    if deny.insert(kind, &r.id, r.expires_at) {
                        new.push(RevokedId { kind, id: r.id });
                    }
                    deny.prune(now);
                    self.state.entries.store(deny.len(), Ordering::Relaxed);
                }
            }
            Some(Event::Heartbeat(_)) | None => {
                let mut deny = self.state.deny.write().unwrap_or_else(|p| p.into_inner());
                deny.prune(now);
                self.state.entries.store(deny.len(), Ordering::Relaxed);
            }
        }
        let heard = if snapshot.is_some() {
            self.state.awaiting_snapshot.store(false, Ordering::Relaxed);
            true
        } else {
            !self.state.awaiting_snapshot.load(Ordering::Relaxed)
        };
        if heard {
            self.state.last_heard.store(now, Ordering::Release);
        }
        if snapshot.is_some() {
            self.state.synced_flag.store(true, Ordering::Release);
            self.state.synced.send_replace(true);
        }
        if heard {
            // Fresh from here on: the next silence is reported anew.
            self.state.reported.store(REPORTED_NONE, Ordering::Relaxed);
        }
        if let Some(entries) = snapshot {
            self.state.report(VerifyEvent::FeedSnapshot { entries });
        }
        if heard {
            self.state.report(VerifyEvent::FeedHeard { at: now });
        }
        for id in new {
            let _ = self.state.events.send(id);
        }
    }

    /// Adds a revocation learnt otherwise than from the stream: one the
    /// service relaying revocations into a [`detached`](Self::detached)
    /// feed has just made durable itself, and must refuse before its own
    /// event comes back. It is refused at once (and kept like any other,
    /// even through a snapshot in progress that lacks it) and announced if
    /// new, but it does not count as hearing from the feed: only the
    /// stream vouches for freshness.
    pub fn insert(&self, kind: RevokedKind, id: &str, expires_at: u64) {
        let now = self.state.clock.now_unix();
        if let Some(set) = self.state.assembling.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            set.insert(kind, id, expires_at);
        }
        let new = {
            let mut deny = self.state.deny.write().unwrap_or_else(|p| p.into_inner());
            let new = deny.insert(kind, id, expires_at);
            deny.prune(now);
            self.state.entries.store(deny.len(), Ordering::Relaxed);
            new
        };
        if new {
            let _ = self.state.events.send(RevokedId { kind, id: id.to_owned() });
        }
    }

    /// A new stream has opened: a partly received snapshot (of the stream
    /// that ended) is forgotten, and the feed is not heard from again
    /// before the new stream's snapshot is complete. Called by the feed's
    /// own stream task; a service relaying revocations into a
    /// [`detached`](Self::detached) feed calls it when its own upstream
    /// reconnects.
    pub fn reconnected(&self) {
        *self.state.assembling.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.state.awaiting_snapshot.store(true, Ordering::Relaxed);
        self.state.connects.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the feed has been heard from within the stale bound.
    pub fn is_fresh(&self) -> bool {
        self.state.health_at(self.state.clock.now_unix()).0 == FeedHealth::Fresh
    }

    /// Number of revoked `jti`s and `sid`s held.
    pub fn revoked_count(&self) -> usize {
        self.state.entries.load(Ordering::Relaxed)
    }

    /// The feed's state now (also in [`Verifier::stats`](super::Verifier::stats)).
    pub fn stats(&self) -> FeedStats {
        self.state.stats()
    }

    /// Resolves once the first complete snapshot has arrived.
    pub async fn wait_synced(&self) {
        let mut rx = self.state.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }
}

fn kind_of(r: &pb::Revocation) -> Option<RevokedKind> {
    match pb::RevocationKind::try_from(r.kind) {
        Ok(pb::RevocationKind::Jti) => Some(RevokedKind::Jti),
        Ok(pb::RevocationKind::Sid) => Some(RevokedKind::Sid),
        _ => None,
    }
}

impl RevocationCheck for RevocationFeed {
    fn check(&self, jti: &str, sid: Option<&str>, now: u64) -> RevocationLookup {
        {
            let deny = self.state.deny.read().unwrap_or_else(|p| p.into_inner());
            if deny.jti.contains_key(jti) || sid.is_some_and(|s| deny.sid.contains_key(s)) {
                return RevocationLookup::Ready(Err(VerifyError::Revoked));
            }
        }
        match self.state.health_at(now) {
            (FeedHealth::Fresh, _) => RevocationLookup::Ready(Ok(())),
            (health, silent) => RevocationLookup::Ready(self.state.stale_answer(health, silent)),
        }
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<RevokedId>> {
        Some(self.state.events.subscribe())
    }

    fn ready(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.wait_synced())
    }

    /// Only the first observer is kept: a feed shared by several verifiers
    /// reports to the first one built.
    fn report_to(&self, observer: Arc<dyn VerifyObserver>) {
        let _ = self.state.observer.set(observer);
    }

    fn feed_stats(&self) -> Option<FeedStats> {
        Some(self.state.stats())
    }
}

async fn watch_loop(channel: Channel, state: Weak<FeedState>, mut stopped: watch::Receiver<()>, opts: FeedOptions) {
    let mut backoff = Backoff::new(opts.initial_backoff, opts.max_backoff);
    loop {
        let mut open_failed = None;
        let mut client = AuthClient::new(channel.clone());
        let opened = tokio::select! {
            r = client.watch_revocations(WatchRevocationsRequest {}) => r,
            _ = stopped.changed() => return,
        };
        match opened {
            Ok(resp) => {
                if let Some(state) = state.upgrade() {
                    RevocationFeed { state: Arc::clone(&state) }.reconnected();
                    state.report(VerifyEvent::FeedConnected);
                }
                let mut stream = resp.into_inner();
                loop {
                    let msg = tokio::select! {
                        m = stream.message() => m,
                        _ = stopped.changed() => return,
                    };
                    match msg {
                        Ok(Some(event)) => {
                            let Some(state) = state.upgrade() else { return };
                            if matches!(&event.event, Some(Event::Snapshot(s)) if !s.more) {
                                backoff.reset();
                            }
                            RevocationFeed { state }.apply(event);
                        }
                        Ok(None) => {
                            tracing::warn!("revocation stream ended; reconnecting");
                            break;
                        }
                        Err(status) => {
                            tracing::warn!(code = ?status.code(), "revocation stream failed; reconnecting");
                            break;
                        }
                    }
                }
                if let Some(state) = state.upgrade() {
                    state.report(VerifyEvent::FeedDisconnected);
                }
            }
            Err(status) => {
                open_failed = Some(status.code());
            }
        }
        let delay = backoff.next_delay();
        if let Some(code) = open_failed {
            tracing::warn!(?code, retry_in = ?delay, "cannot open the revocation stream");
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped.changed() => return,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::ManualClock;
    use crate::verify::observe::Recorder;

    fn revoked(kind: pb::RevocationKind, id: &str, expires_at: u64) -> pb::Revocation {
        pb::Revocation { kind: kind as i32, id: id.into(), expires_at }
    }

    fn snapshot(entries: Vec<pb::Revocation>) -> pb::RevocationEvent {
        chunk(entries, false)
    }

    fn chunk(entries: Vec<pb::Revocation>, more: bool) -> pb::RevocationEvent {
        pb::RevocationEvent { event: Some(Event::Snapshot(pb::RevocationSnapshot { entries, more })) }
    }

    fn event(r: pb::Revocation) -> pb::RevocationEvent {
        pb::RevocationEvent { event: Some(Event::Revoked(r)) }
    }

    fn heartbeat() -> pb::RevocationEvent {
        pb::RevocationEvent { event: Some(Event::Heartbeat(pb::Heartbeat { server_time: 0 })) }
    }

    fn ready(l: RevocationLookup) -> Result<(), VerifyError> {
        match l {
            RevocationLookup::Ready(r) => r,
            RevocationLookup::Pending(_) => panic!("feed lookups never wait"),
        }
    }

    fn feed(clock: &ManualClock) -> RevocationFeed {
        RevocationFeed::detached(Arc::new(clock.clone()), FeedOptions::default()).unwrap()
    }

    #[test]
    fn feed_fails_closed_before_the_first_snapshot() {
        let clock = ManualClock::new(1_000);
        let f = feed(&clock);
        assert_eq!(ready(f.check("j", None, 1_000)), Err(VerifyError::FeedStale));
        f.apply(heartbeat());
        assert_eq!(ready(f.check("j", None, 1_000)), Err(VerifyError::FeedStale), "a heartbeat is no snapshot");
        f.apply(snapshot(vec![]));
        assert_eq!(ready(f.check("j", None, 1_000)), Ok(()));
    }

    #[test]
    fn snapshot_and_events_deny_jti_and_sid() {
        let clock = ManualClock::new(1_000);
        let f = feed(&clock);
        f.apply(snapshot(vec![revoked(pb::RevocationKind::Jti, "j1", 2_000)]));
        f.apply(event(revoked(pb::RevocationKind::Sid, "s1", 2_000)));
        f.apply(event(revoked(pb::RevocationKind::Family, "f1", 2_000)));
        assert_eq!(ready(f.check("j1", None, 1_000)), Err(VerifyError::Revoked));
        assert_eq!(ready(f.check("j2", Some("s1"), 1_000)), Err(VerifyError::Revoked));
        assert_eq!(ready(f.check("j2", Some("s2"), 1_000)), Ok(()));
        assert_eq!(f.revoked_count(), 2, "families are the auth server's business");
    }

    #[test]
    fn feed_goes_stale_after_the_bound_and_recovers_on_a_message() {
        let clock = ManualClock::new(1_000);
        let f = feed(&clock);
        f.apply(snapshot(vec![]));
        clock.advance(30);
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Ok(()));
        clock.advance(1);
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Err(VerifyError::FeedStale));
        assert!(!f.is_fresh());
        f.apply(heartbeat());
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Ok(()));
    }

    #[test]
    fn entries_are_pruned_once_their_tokens_cannot_be_valid() {
        let clock = ManualClock::new(1_000);
        let f = feed(&clock);
        f.apply(snapshot(vec![
            revoked(pb::RevocationKind::Jti, "short", 1_100),
            revoked(pb::RevocationKind::Jti, "long", 9_000),
        ]));
        clock.advance(100 + MAX_LEEWAY_SECS);
        f.apply(heartbeat());
        assert_eq!(f.revoked_count(), 2, "kept through the largest leeway");
        clock.advance(31);
        f.apply(heartbeat());
        assert_eq!(f.revoked_count(), 1);
        assert_eq!(ready(f.check("long", None, clock.now_unix())), Err(VerifyError::Revoked));
    }

    #[test]
    fn feed_reports_snapshots_messages_and_each_silence_once() {
        let clock = ManualClock::new(1_000);
        let f = feed(&clock);
        let events = Arc::new(Recorder::default());
        f.report_to(events.clone());
        f.report_to(Arc::new(Recorder::default()));
        for _ in 0..2 {
            assert_eq!(ready(f.check("j", None, clock.now_unix())), Err(VerifyError::FeedStale));
        }
        assert_eq!(events.take(), ["FeedStale"], "no snapshot yet: stale, reported once");
        f.apply(snapshot(vec![revoked(pb::RevocationKind::Jti, "j1", 2_000)]));
        assert_eq!(events.take(), ["FeedSnapshot { entries: 1 }", "FeedHeard { at: 1000 }"]);
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Ok(()));
        clock.advance(31);
        for _ in 0..2 {
            assert_eq!(ready(f.check("j", None, clock.now_unix())), Err(VerifyError::FeedStale));
        }
        f.apply(heartbeat());
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Ok(()));
        assert_eq!(events.take(), ["FeedStale", "FeedHeard { at: 1031 }"]);
    }

    #[test]
    fn a_chunked_snapshot_counts_only_once_its_last_chunk_is_in() {
        let clock = ManualClock::new(1_000);
        let f = feed(&clock);
        f.apply(chunk(vec![revoked(pb::RevocationKind::Jti, "j1", 2_000)], true));
        f.apply(chunk(vec![revoked(pb::RevocationKind::Sid, "s1", 2_000)], true));
        assert!(!f.is_fresh());
        assert_eq!(ready(f.check("j2", None, 1_000)), Err(VerifyError::FeedStale), "not ready mid-snapshot");
        assert_eq!(f.revoked_count(), 0, "nothing applied before the last chunk");
        f.apply(chunk(vec![revoked(pb::RevocationKind::Jti, "j3", 2_000)], false));
        assert!(f.is_fresh());
        assert_eq!(f.revoked_count(), 3);
        assert_eq!(ready(f.check("j1", None, 1_000)), Err(VerifyError::Revoked));
        assert_eq!(ready(f.check("j2", Some("s1"), 1_000)), Err(VerifyError::Revoked));
        assert_eq!(ready(f.check("j3", None, 1_000)), Err(VerifyError::Revoked));
        assert_eq!(ready(f.check("j2", None, 1_000)), Ok(()));
    }

    #[test]
    fn a_new_snapshot_takes_effect_after_its_last_chunk_keeping_known_ids() {
        let clock = ManualClock::new(1_000);
        let f = feed(&clock);
        f.apply(snapshot(vec![revoked(pb::RevocationKind::Jti, "old", 2_000)]));
        f.apply(chunk(vec![revoked(pb::RevocationKind::Jti, "gap", 2_000)], true));
        assert_eq!(ready(f.check("old", None, 1_000)), Err(VerifyError::Revoked), "old set intact meanwhile");
        // A revocation heard mid-snapshot lands in both sets.
        f.apply(event(revoked(pb::RevocationKind::Sid, "s1", 2_000)));
        f.apply(chunk(vec![], false));
        assert_eq!(ready(f.check("old", None, 1_000)), Err(VerifyError::Revoked), "never lifted");
        assert_eq!(ready(f.check("gap", None, 1_000)), Err(VerifyError::Revoked));
        assert_eq!(ready(f.check("x", Some("s1"), 1_000)), Err(VerifyError::Revoked));
        assert_eq!(f.revoked_count(), 3);
    }

    #[test]
    fn a_stale_feed_stays_stale_until_a_resnapshot_is_complete() {
        let clock = ManualClock::new(1_000);
        let f = feed(&clock);
        f.apply(snapshot(vec![]));
        clock.advance(31);
        f.apply(chunk(vec![revoked(pb::RevocationKind::Jti, "gap", 2_000)], true));
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Err(VerifyError::FeedStale));
        f.apply(chunk(vec![], false));
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Ok(()));
        assert_eq!(ready(f.check("gap", None, clock.now_unix())), Err(VerifyError::Revoked));
    }

    #[test]
    fn a_partial_snapshot_from_a_broken_stream_is_discarded() {
        let clock = ManualClock::new(1_000);
        let f = feed(&clock);
        f.apply(chunk(vec![revoked(pb::RevocationKind::Jti, "half", 2_000)], true));
        f.reconnected();
        f.apply(snapshot(vec![revoked(pb::RevocationKind::Jti, "whole", 2_000)]));
        assert_eq!(ready(f.check("half", None, 1_000)), Ok(()));
        assert_eq!(ready(f.check("whole", None, 1_000)), Err(VerifyError::Revoked));
    }

    fn feed_with(clock: &ManualClock, on_stale: StalePolicy) -> RevocationFeed {
        RevocationFeed::detached(Arc::new(clock.clone()), FeedOptions { on_stale, ..FeedOptions::default() }).unwrap()
    }

    fn serve_for(secs: u64) -> StalePolicy {
        StalePolicy::ServeLastKnown { up_to: Duration::from_secs(secs) }
    }

    /// `(health, silent_for_secs, stale_episodes, served_stale)`.
    fn state(f: &RevocationFeed) -> (FeedHealth, Option<u64>, u64, u64) {
        let s = f.stats();
        (s.health, s.silent_for_secs, s.stale_episodes, s.served_stale)
    }

    #[test]
    fn fail_closed_is_the_default_and_stats_follow_each_transition() {
        assert_eq!(FeedOptions::default().on_stale, StalePolicy::FailClosed);
        let clock = ManualClock::new(1_000);
        let f = feed(&clock);
        let events = Arc::new(Recorder::default());
        f.report_to(events.clone());
        assert_eq!(state(&f), (FeedHealth::Syncing, None, 0, 0));
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Err(VerifyError::FeedStale));
        assert_eq!(state(&f), (FeedHealth::Syncing, None, 0, 0), "no snapshot yet is no stale episode");

        f.apply(snapshot(vec![revoked(pb::RevocationKind::Jti, "j1", 2_000)]));
        assert_eq!(state(&f), (FeedHealth::Fresh, Some(0), 0, 0));
        assert_eq!(f.stats().entries, 1);
        clock.advance(30);
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Ok(()));
        assert_eq!(state(&f), (FeedHealth::Fresh, Some(30), 0, 0));
        events.take();

        clock.advance(1);
        assert_eq!(state(&f), (FeedHealth::Stale, Some(31), 1, 0), "stale before any check notices");
        for _ in 0..3 {
            assert_eq!(ready(f.check("j", None, clock.now_unix())), Err(VerifyError::FeedStale));
            assert_eq!(ready(f.check("j1", None, clock.now_unix())), Err(VerifyError::Revoked));
        }
        assert_eq!(events.take(), ["FeedStale"], "reported once per silence");
        assert_eq!(state(&f), (FeedHealth::Stale, Some(31), 1, 0), "and counted once");
        clock.advance(3_600);
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Err(VerifyError::FeedStale), "for ever");

        f.apply(heartbeat());
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Ok(()));
        assert_eq!(state(&f), (FeedHealth::Fresh, Some(0), 1, 0));
        clock.advance(31);
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Err(VerifyError::FeedStale));
        assert_eq!(state(&f), (FeedHealth::Stale, Some(31), 2, 0), "a new silence, a new episode");
    }

    #[test]
    fn serve_last_known_answers_up_to_its_bound_then_fails_closed() {
        let clock = ManualClock::new(1_000);
        let f = feed_with(&clock, serve_for(60));
        let events = Arc::new(Recorder::default());
        f.report_to(events.clone());
        f.apply(snapshot(vec![
            revoked(pb::RevocationKind::Jti, "j1", 9_000),
            revoked(pb::RevocationKind::Sid, "s1", 9_000),
        ]));
        events.take();

        clock.advance(31);
        assert_eq!(state(&f), (FeedHealth::ServingStale, Some(31), 1, 0));
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Ok(()), "answered from the last known set");
        assert_eq!(ready(f.check("j1", None, clock.now_unix())), Err(VerifyError::Revoked), "known revocations hold");
        assert_eq!(ready(f.check("j", Some("s1"), clock.now_unix())), Err(VerifyError::Revoked));
        clock.advance(59);
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Ok(()), "through the last second of up_to");
        assert_eq!(state(&f), (FeedHealth::ServingStale, Some(90), 1, 2));
        assert_eq!(events.take(), ["FeedServingStale { until: 1090 }", "ServedStale", "ServedStale"]);

        clock.advance(1);
        assert_eq!(state(&f), (FeedHealth::Stale, Some(91), 1, 2));
        for _ in 0..2 {
            assert_eq!(ready(f.check("j", None, clock.now_unix())), Err(VerifyError::FeedStale));
        }
        assert_eq!(ready(f.check("j1", None, clock.now_unix())), Err(VerifyError::Revoked));
        assert_eq!(events.take(), ["FeedStale"], "the end of serving is reported once");
        assert_eq!(state(&f), (FeedHealth::Stale, Some(91), 1, 2), "still one episode");

        f.apply(heartbeat());
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Ok(()));
        assert_eq!(state(&f), (FeedHealth::Fresh, Some(0), 1, 2), "fresh answers are not counted as stale");
        assert_eq!(events.take(), ["FeedHeard { at: 1091 }"]);
    }

    #[test]
    fn serve_last_known_never_answers_before_the_first_snapshot() {
        let clock = ManualClock::new(1_000);
        let f = feed_with(&clock, serve_for(3_600));
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Err(VerifyError::FeedStale));
        f.apply(heartbeat());
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Err(VerifyError::FeedStale));
        assert_eq!(state(&f), (FeedHealth::Syncing, None, 0, 0));
    }

    #[test]
    fn a_reconnected_feed_is_fresh_again_only_after_a_complete_snapshot() {
        let clock = ManualClock::new(1_000);
        let f = feed_with(&clock, serve_for(60));
        let events = Arc::new(Recorder::default());
        f.report_to(events.clone());
        f.reconnected();
        f.apply(snapshot(vec![]));
        assert_eq!(f.stats().reconnects, 0, "the first stream is no reconnect");
        clock.advance(100);
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Err(VerifyError::FeedStale));
        events.take();

        f.reconnected();
        // Whatever comes before the new snapshot is complete does not make
        // the feed heard from: revocations missed meanwhile may be in it.
        f.apply(heartbeat());
        f.apply(event(revoked(pb::RevocationKind::Jti, "early", 2_000)));
        f.apply(chunk(vec![revoked(pb::RevocationKind::Jti, "gap", 2_000)], true));
        f.apply(heartbeat());
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Err(VerifyError::FeedStale));
        assert_eq!(ready(f.check("early", None, clock.now_unix())), Err(VerifyError::Revoked), "still applied");
        assert_eq!(state(&f), (FeedHealth::Stale, Some(100), 1, 0));
        assert_eq!(events.take(), Vec::<String>::new(), "nothing heard");

        f.apply(chunk(vec![], false));
        assert_eq!(state(&f), (FeedHealth::Fresh, Some(0), 1, 0));
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Ok(()));
        assert_eq!(ready(f.check("gap", None, clock.now_unix())), Err(VerifyError::Revoked));
        assert_eq!(ready(f.check("early", None, clock.now_unix())), Err(VerifyError::Revoked), "not lifted");
        assert_eq!(f.stats().reconnects, 1);
        assert_eq!(events.take(), ["FeedSnapshot { entries: 2 }", "FeedHeard { at: 1100 }"]);
        // On the same stream, a heartbeat is news again.
        clock.advance(10);
        f.apply(heartbeat());
        assert_eq!(f.stats().silent_for_secs, Some(0));
    }

    #[test]
    fn a_snapshot_resent_on_an_open_stream_holds_freshness_until_its_last_chunk() {
        let clock = ManualClock::new(1_000);
        let f = feed(&clock);
        f.reconnected();
        f.apply(snapshot(vec![]));
        clock.advance(20);
        // The server lost messages and resends the whole set in place.
        f.apply(chunk(vec![revoked(pb::RevocationKind::Jti, "lost", 2_000)], true));
        f.apply(heartbeat());
        assert_eq!(f.stats().silent_for_secs, Some(20), "a heartbeat mid-snapshot is not news");
        clock.advance(11);
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Err(VerifyError::FeedStale));
        f.apply(chunk(vec![], false));
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Ok(()));
        assert_eq!(ready(f.check("lost", None, clock.now_unix())), Err(VerifyError::Revoked));
        assert_eq!(f.stats().reconnects, 0, "no new stream");
    }

    #[test]
    fn options_are_validated() {
        let with = |f: fn(&mut FeedOptions)| {
            let mut o = FeedOptions::default();
            f(&mut o);
            o.validate()
        };
        assert_eq!(with(|_| ()), Ok(()));
        assert_eq!(with(|o| o.on_stale = serve_for(300)), Ok(()));
        assert_eq!(with(|o| o.stale_after = Duration::ZERO), Err(FeedOptionsError::StaleAfter));
        assert_eq!(with(|o| o.stale_after = Duration::from_millis(999)), Err(FeedOptionsError::StaleAfter));
        assert_eq!(with(|o| o.stale_after = Duration::from_secs(601)), Err(FeedOptionsError::StaleAfter));
        assert_eq!(with(|o| o.on_stale = serve_for(0)), Err(FeedOptionsError::ServeUpTo));
        assert_eq!(with(|o| o.on_stale = serve_for(3_601)), Err(FeedOptionsError::ServeUpTo));
        assert_eq!(with(|o| o.initial_backoff = Duration::ZERO), Err(FeedOptionsError::Backoff));
        assert_eq!(with(|o| o.max_backoff = Duration::from_secs(31)), Err(FeedOptionsError::Backoff));
    }

    #[tokio::test]
    async fn feeds_refuse_nonsense_options_in_every_constructor() {
        let clock = ManualClock::new(1_000);
        let channel = || Channel::from_static("http://127.0.0.1:1").connect_lazy();
        let bad = [
            (FeedOptions { on_stale: serve_for(0), ..FeedOptions::default() }, FeedOptionsError::ServeUpTo),
            (FeedOptions { on_stale: serve_for(3_601), ..FeedOptions::default() }, FeedOptionsError::ServeUpTo),
            (
                FeedOptions {
                    on_stale: StalePolicy::ServeLastKnown { up_to: Duration::MAX },
                    ..FeedOptions::default()
                },
                FeedOptionsError::ServeUpTo,
            ),
            (FeedOptions { stale_after: Duration::ZERO, ..FeedOptions::default() }, FeedOptionsError::StaleAfter),
            (
                FeedOptions { stale_after: Duration::from_secs(601), ..FeedOptions::default() },
                FeedOptionsError::StaleAfter,
            ),
            (
                FeedOptions { stale_after: Duration::MAX, max_backoff: Duration::MAX, ..FeedOptions::default() },
                FeedOptionsError::StaleAfter,
            ),
            (FeedOptions { initial_backoff: Duration::ZERO, ..FeedOptions::default() }, FeedOptionsError::Backoff),
        ];
        for (opts, err) in bad {
            let clock = || Arc::new(clock.clone());
            assert_eq!(RevocationFeed::detached(clock(), opts.clone()).unwrap_err(), err, "{opts:?}");
            assert_eq!(RevocationFeed::connect(channel(), clock(), opts.clone()).unwrap_err(), err, "{opts:?}");
            let observer = Arc::new(Recorder::default());
            let reporting = RevocationFeed::connect_reporting(channel(), clock(), opts.clone(), observer);
            assert_eq!(reporting.unwrap_err(), err, "{opts:?}");
        }
        // The longest serving accepted is bounded: past it, fail closed.
        let f = feed_with(&clock, serve_for(3_600));
        f.apply(snapshot(vec![]));
        clock.advance(30 + 3_600);
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Ok(()));
        clock.advance(1);
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Err(VerifyError::FeedStale));
        RevocationFeed::connect(channel(), Arc::new(clock.clone()), FeedOptions::default()).unwrap();
    }

    #[test]
    fn a_resent_snapshot_keeps_known_unexpired_revocations() {
        let clock = ManualClock::new(1_000);
        let f = feed(&clock);
        let mut rx = f.subscribe().unwrap();
        f.apply(snapshot(vec![]));
        // Known from events; "done" can no longer be valid even with the
        // largest leeway.
        f.apply(event(revoked(pb::RevocationKind::Jti, "x", 2_000)));
        f.apply(event(revoked(pb::RevocationKind::Sid, "s", 2_000)));
        f.apply(event(revoked(pb::RevocationKind::Jti, "done", 1_000 - MAX_LEEWAY_SECS - 1)));
        clock.advance(10);
        // The server resends its shared snapshot, which lacks them (its
        // `since` revocations would follow as separate messages).
        f.apply(chunk(vec![revoked(pb::RevocationKind::Jti, "shared", 2_000)], true));
        f.apply(chunk(vec![], false));
        assert!(f.is_fresh());
        assert_eq!(ready(f.check("x", None, clock.now_unix())), Err(VerifyError::Revoked), "never lifted");
        assert_eq!(ready(f.check("j", Some("s"), clock.now_unix())), Err(VerifyError::Revoked));
        assert_eq!(ready(f.check("shared", None, clock.now_unix())), Err(VerifyError::Revoked));
        assert_eq!(ready(f.check("done", None, clock.now_unix())), Ok(()), "expired entries are not carried over");
        assert_eq!(f.revoked_count(), 3);
        let announced: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).map(|r| r.id).collect();
        assert_eq!(announced, ["x", "s", "done", "shared"], "carried-over ids are not announced again");
    }

    #[test]
    fn an_inserted_revocation_is_refused_at_once_survives_a_snapshot_and_is_no_news_from_the_feed() {
        let clock = ManualClock::new(1_000);
        let f = feed(&clock);
        let mut rx = f.subscribe().unwrap();
        f.insert(RevokedKind::Jti, "early", 2_000);
        assert_eq!(ready(f.check("early", None, 1_000)), Err(VerifyError::Revoked), "before any snapshot");
        assert_eq!(ready(f.check("j", None, 1_000)), Err(VerifyError::FeedStale), "an insert is no snapshot");
        f.apply(snapshot(vec![]));
        clock.advance(20);
        // Inserted while a snapshot that lacks it is coming in.
        f.apply(chunk(vec![revoked(pb::RevocationKind::Jti, "other", 2_000)], true));
        f.insert(RevokedKind::Sid, "s1", 2_000);
        f.insert(RevokedKind::Jti, "early", 2_000);
        f.apply(chunk(vec![], false));
        assert_eq!(ready(f.check("early", None, clock.now_unix())), Err(VerifyError::Revoked), "never lifted");
        assert_eq!(ready(f.check("j", Some("s1"), clock.now_unix())), Err(VerifyError::Revoked));
        assert_eq!(f.revoked_count(), 3);
        clock.advance(9);
        f.insert(RevokedKind::Jti, "late", 2_000);
        clock.advance(2);
        assert_eq!(f.stats().silent_for_secs, Some(11), "inserts do not vouch for the feed");
        assert_eq!(ready(f.check("j", None, clock.now_unix())), Ok(()));
        let announced: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).map(|r| r.id).collect();
        assert_eq!(announced, ["early", "s1", "other", "late"], "each new id announced once");
    }

    #[test]
    fn new_revocations_are_announced_once() {
        let clock = ManualClock::new(1_000);
        let f = feed(&clock);
        let mut rx = f.subscribe().unwrap();
        f.apply(snapshot(vec![revoked(pb::RevocationKind::Jti, "j1", 2_000)]));
        f.apply(event(revoked(pb::RevocationKind::Jti, "j1", 2_000)));
        f.apply(event(revoked(pb::RevocationKind::Sid, "s1", 2_000)));
        assert_eq!(rx.try_recv().unwrap(), RevokedId { kind: RevokedKind::Jti, id: "j1".into() });
        assert_eq!(rx.try_recv().unwrap(), RevokedId { kind: RevokedKind::Sid, id: "s1".into() });
        assert!(rx.try_recv().is_err());
    }
}
