//! Revocation: is this token's `jti` or `sid` on the deny list?
//!
//! [`RevocationCheck`] is the port; [`RevocationFeed`] (the default, push
//! mode) keeps a `WatchRevocations` stream open and answers from a local
//! deny set, so the per-request check is a memory lookup. With the `redis`
//! feature, `RedisRevocation` asks Redis on every request instead.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::{self as pb, WatchRevocationsRequest, revocation_event::Event};
use tokio::sync::{broadcast, watch};
use tonic::transport::Channel;

use super::observe::{VerifyEvent, VerifyObserver};
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
}

/// Timing of a [`RevocationFeed`].
#[derive(Clone, Debug)]
pub struct FeedOptions {
    /// How long the feed may be silent (no snapshot, event or heartbeat)
    /// before verification fails closed with `Unavailable` (default 30 s).
    pub stale_after: Duration,
    /// First reconnect delay (default 100 ms); doubles up to
    /// [`FeedOptions::max_backoff`].
    pub initial_backoff: Duration,
    /// Longest reconnect delay (default 5 s).
    pub max_backoff: Duration,
}

impl Default for FeedOptions {
    fn default() -> Self {
        Self {
            stale_after: Duration::from_secs(30),
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

    /// Forgets entries whose tokens cannot be valid any more, even with the
    /// largest leeway a validator allows. Runs at most every 30 s.
    fn len(&self) -> usize {
        self.jti.len() + self.sid.len()
    }

    /// The ids in `self` that `old` does not hold.
    fn added_since(&self, old: &DenySet) -> Vec<RevokedId> {
        let jti = self.jti.keys().filter(|id| !old.jti.contains_key(*id)).map(|id| (RevokedKind::Jti, id));
        let sid = self.sid.keys().filter(|id| !old.sid.contains_key(*id)).map(|id| (RevokedKind::Sid, id));
        jti.chain(sid).map(|(kind, id)| RevokedId { kind, id: id.clone() }).collect()
    }

    fn prune(&mut self, now: u64) {
        if now < self.next_prune {
            return;
        }
        self.next_prune = now.saturating_add(30);
        let live = |_: &String, exp: &mut u64| exp.saturating_add(MAX_LEEWAY_SECS) >= now;
        self.jti.retain(live);
        self.sid.retain(live);
    }
}

/// The push-mode revocation check: a local deny set of `jti`s and `sid`s,
/// kept current by a `WatchRevocations` stream (snapshot, then events and
/// heartbeats), reconnecting with backoff. A snapshot may come in chunks;
/// the feed is ready only once a snapshot's last chunk is in, and each new
/// snapshot replaces the whole set at once. Clones share one feed; the
/// stream closes when the last clone is dropped.
///
/// When nothing has been heard for longer than
/// [`FeedOptions::stale_after`] (or before the first snapshot), every
/// check fails closed with [`VerifyError::FeedStale`].
///
/// A feed reports its connection, snapshots, messages and staleness to
/// the observer of the first verifier built with it (see
/// [`VerifyEvent`]).
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
    /// Unix seconds of the last message; meaningful once `synced`.
    last_heard: AtomicU64,
    synced: watch::Sender<bool>,
    stale_after: u64,
    clock: Arc<dyn Clock>,
    events: broadcast::Sender<RevokedId>,
    observer: OnceLock<Arc<dyn VerifyObserver>>,
    /// Whether [`VerifyEvent::FeedStale`] was reported since the feed was
    /// last heard from.
    stale_reported: AtomicBool,
    /// Dropped with the state, which ends the stream task.
    _stop: watch::Sender<()>,
}

impl FeedState {
    fn report(&self, event: VerifyEvent<'_>) {
        if let Some(observer) = self.observer.get() {
            observer.on_event(&event);
        }
    }
}

impl RevocationFeed {
    /// Opens the `WatchRevocations` stream on `channel` (an mTLS channel to
    /// the auth service) and keeps it open. Must be called within a tokio
    /// runtime.
    pub fn connect(channel: Channel, clock: Arc<dyn Clock>, opts: FeedOptions) -> Self {
        let (feed, stopped) = Self::new(clock, &opts);
        tokio::spawn(watch_loop(channel, Arc::downgrade(&feed.state), stopped, opts));
        feed
    }

    /// [`RevocationFeed::connect`], reporting to `observer` from the start.
    pub(crate) fn connect_reporting(
        channel: Channel,
        clock: Arc<dyn Clock>,
        opts: FeedOptions,
        observer: Arc<dyn VerifyObserver>,
    ) -> Self {
        let (feed, stopped) = Self::new(clock, &opts);
        feed.report_to(observer);
        tokio::spawn(watch_loop(channel, Arc::downgrade(&feed.state), stopped, opts));
        feed
    }

    /// A feed with no stream: events arrive only through
    /// [`RevocationFeed::apply`] (tests, or a service that relays
    /// revocations itself).
    pub fn detached(clock: Arc<dyn Clock>, opts: FeedOptions) -> Self {
        Self::new(clock, &opts).0
    }

    fn new(clock: Arc<dyn Clock>, opts: &FeedOptions) -> (Self, watch::Receiver<()>) {
        let (stop, stopped) = watch::channel(());
        let (synced, _) = watch::channel(false);
        let state = FeedState {
            deny: RwLock::new(DenySet::default()),
            assembling: Mutex::new(None),
            last_heard: AtomicU64::new(0),
            synced,
            stale_after: opts.stale_after.as_secs(),
            clock,
            events: broadcast::channel(1024).0,
            observer: OnceLock::new(),
            stale_reported: AtomicBool::new(false),
            _stop: stop,
        };
        (Self { state: Arc::new(state) }, stopped)
    }

    /// Applies one message of the stream.
    ///
    /// A snapshot arrives in chunks (each but the last marked `more`); the
    /// chunks are gathered aside and replace the whole deny set at once
    /// with the last one. Until then nothing changes: the feed is neither
    /// synced nor heard from, so a feed that was stale stays stale until
    /// the whole snapshot is in.
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
                    return;
                }
                let mut complete = assembling.take().unwrap_or_default();
                drop(assembling);
                let mut deny = self.state.deny.write().unwrap_or_else(|p| p.into_inner());
                new = complete.added_since(&deny);
                complete.next_prune = deny.next_prune;
                let old = std::mem::replace(&mut *deny, complete);
                deny.prune(now);
                snapshot = Some(deny.len());
                drop(deny);
                // Freed outside the lock.
                drop(old);
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
                }
            }
            Some(Event::Heartbeat(_)) | None => {
                self.state.deny.write().unwrap_or_else(|p| p.into_inner()).prune(now);
            }
        }
        self.state.last_heard.store(now, Ordering::Release);
        if snapshot.is_some() {
            self.state.synced.send_replace(true);
        }
        // Fresh from here on: the next silence is reported anew.
        self.state.stale_reported.store(false, Ordering::Relaxed);
        if let Some(entries) = snapshot {
            self.state.report(VerifyEvent::FeedSnapshot { entries });
        }
        self.state.report(VerifyEvent::FeedHeard { at: now });
        for id in new {
            let _ = self.state.events.send(id);
        }
    }

    /// Forgets a partly received snapshot (its stream ended).
    fn discard_partial_snapshot(&self) {
        *self.state.assembling.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Whether the feed has been heard from within the stale bound.
    pub fn is_fresh(&self) -> bool {
        self.fresh_at(self.state.clock.now_unix())
    }

    fn fresh_at(&self, now: u64) -> bool {
        *self.state.synced.borrow()
            && now <= self.state.last_heard.load(Ordering::Acquire).saturating_add(self.state.stale_after)
    }

    /// Number of revoked `jti`s and `sid`s held.
    pub fn revoked_count(&self) -> usize {
        self.state.deny.read().unwrap_or_else(|p| p.into_inner()).len()
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
        if !self.fresh_at(now) {
            if !self.state.stale_reported.swap(true, Ordering::Relaxed) {
                self.state.report(VerifyEvent::FeedStale);
            }
            return RevocationLookup::Ready(Err(VerifyError::FeedStale));
        }
        RevocationLookup::Ready(Ok(()))
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
                    RevocationFeed { state: Arc::clone(&state) }.discard_partial_snapshot();
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
        RevocationFeed::detached(Arc::new(clock.clone()), FeedOptions::default())
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
    fn a_new_snapshot_replaces_the_set_whole_after_its_last_chunk() {
        let clock = ManualClock::new(1_000);
        let f = feed(&clock);
        f.apply(snapshot(vec![revoked(pb::RevocationKind::Jti, "old", 2_000)]));
        f.apply(chunk(vec![revoked(pb::RevocationKind::Jti, "gap", 2_000)], true));
        assert_eq!(ready(f.check("old", None, 1_000)), Err(VerifyError::Revoked), "old set intact meanwhile");
        // A revocation heard mid-snapshot lands in both sets.
        f.apply(event(revoked(pb::RevocationKind::Sid, "s1", 2_000)));
        f.apply(chunk(vec![], false));
        assert_eq!(ready(f.check("old", None, 1_000)), Ok(()), "replaced, not merged");
        assert_eq!(ready(f.check("gap", None, 1_000)), Err(VerifyError::Revoked));
        assert_eq!(ready(f.check("x", Some("s1"), 1_000)), Err(VerifyError::Revoked));
        assert_eq!(f.revoked_count(), 2);
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
        f.discard_partial_snapshot();
        f.apply(snapshot(vec![revoked(pb::RevocationKind::Jti, "whole", 2_000)]));
        assert_eq!(ready(f.check("half", None, 1_000)), Ok(()));
        assert_eq!(ready(f.check("whole", None, 1_000)), Err(VerifyError::Revoked));
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
