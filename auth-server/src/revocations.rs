//! The replica's own deny set: the auth server checks the tokens presented
//! to it (subject tokens, revocation proofs, bearer tokens of Revoke) the
//! way every verifier does, against a local set kept current by the
//! store's push feed, so a check is a memory lookup and ExchangeToken with
//! a subject token makes no store round trip.
//!
//! It is the SDK's [`RevocationFeed`], detached, with this module as its
//! relay instead of a `WatchRevocations` stream. The relay task follows
//! [`Store::feed_state`]: while the store's feed is live it reads a
//! snapshot (`Snapshots`, shared with the watch streams that read one at
//! the same time), then applies each revocation the store publishes
//! ([`Store::subscribe`]) and a heartbeat every second. When the epoch
//! moves (the store may have lost events) or the relay falls behind the
//! store's broadcast, it reads a fresh snapshot, after which the feed is
//! fresh again; a revocation already known is never lifted. Until that
//! snapshot is in, checks fail closed: the set is current only for the
//! store feed's epoch its last snapshot was read in, and not while a
//! re-read is due.
//!
//! A check fails closed ([`AuthError::RevocationFeed`], `UNAVAILABLE`):
//! - while the store's feed is not live (a Redis subscription cut off or
//!   unconfirmed: revocations made elsewhere may not arrive);
//! - before the first complete snapshot;
//! - from the moment the store's feed moves to another epoch, or the relay
//!   falls behind its events, until a snapshot read since is applied;
//! - after [`STALE_AFTER`] without a heartbeat (a stuck relay, a snapshot
//!   read that does not finish).
//!
//! An id already known to be revoked is refused in every state.
//! Staleness is real elapsed time (tokio's monotonic clock): the injected
//! clock is the tokens' clock, which a test may move by hours, while a
//! feed is only as fresh as it was recently heard from.
//!
//! A revocation made on this replica is inserted once the store has
//! acknowledged it as durable ([`Revocations::insert`]), before its own
//! event comes back over the feed: the next request on this replica
//! already refuses the token, and nothing unacknowledged is ever trusted.

mod snapshots;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use auth_proto::auth::v1 as pb;
use service_sdk::{
    Clock, FeedOptions, FeedStats, RevocationCheck as _, RevocationFeed, StalePolicy, VerifyError,
    verify::{RevocationLookup, RevokedKind},
};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tokio::time::Instant;

pub(crate) use self::snapshots::{Snapshot, Snapshots, revoked, to_pb};
use service_sdk::backoff::Backoff;
use service_sdk::verify::FeedOptionsError;

use crate::clock::SharedClock;
use crate::error::AuthError;
use crate::store::{FeedState, Revocation, RevocationKind, Store};

/// How long the deny set may go without a heartbeat from its relay before
/// checks fail closed.
pub const STALE_AFTER: Duration = Duration::from_secs(10);

/// How often the relay vouches for a live store feed.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// The replica's deny set; see the [module docs](self). Cheap to clone;
/// the relay stops when the last clone is dropped.
#[derive(Clone)]
pub struct Revocations {
    inner: Arc<Inner>,
}

struct Inner {
    feed: RevocationFeed,
    /// The feed's clock: checks are judged by it.
    clock: Arc<Monotonic>,
    /// The store's feed: checks fail closed while it is not live.
    store_feed: watch::Receiver<FeedState>,
    snapshots: Arc<Snapshots>,
    /// Whether the set is complete for the store feed's current epoch.
    sync: Arc<SyncState>,
    /// Dropped with the last clone, which ends the relay.
    _stop: watch::Sender<()>,
}

/// What the relay has applied, for checks to judge the set by.
#[derive(Debug)]
struct SyncState {
    /// The store feed's epoch of the last snapshot applied; `u64::MAX`:
    /// none yet.
    epoch: AtomicU64,
    /// Events were lost (a lag) and no snapshot has been applied since.
    behind: AtomicBool,
}

impl SyncState {
    fn new() -> Self {
        Self { epoch: AtomicU64::new(u64::MAX), behind: AtomicBool::new(true) }
    }

    /// Whether the set holds everything up to `store`'s state.
    fn complete_for(&self, store: FeedState) -> bool {
        store.live && !self.behind.load(Ordering::Acquire) && self.epoch.load(Ordering::Acquire) == store.epoch
    }
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations").field("feed", &self.inner.feed).finish_non_exhaustive()
    }
}

/// The feed's clock: `clock`'s reading at start, moved on by tokio's
/// monotonic clock. Heartbeats are judged by it, and entries pruned once
/// it is past their expiry (never earlier than the tokens' clock would,
/// as long as that one does not run slow).
struct Monotonic {
    start_unix: u64,
    start: Instant,
}

impl Clock for Monotonic {
    fn now_unix(&self) -> u64 {
        self.start_unix.saturating_add(self.start.elapsed().as_secs())
    }
}

impl Revocations {
    /// Starts following `store`'s revocations, in a task of the current
    /// tokio runtime. Checks fail closed until the first snapshot is in
    /// ([`Revocations::synced`]). The feed's options are constants, which
    /// the SDK checks all the same.
    pub fn start(store: Arc<dyn Store>, clock: &SharedClock) -> Result<Self, FeedOptionsError> {
        let monotonic = Arc::new(Monotonic { start_unix: clock.now_unix(), start: Instant::now() });
        let opts =
            FeedOptions { stale_after: STALE_AFTER, on_stale: StalePolicy::FailClosed, ..FeedOptions::default() };
        let feed = RevocationFeed::detached(Arc::clone(&monotonic) as Arc<dyn Clock>, opts)?;
        let (stop, stopped) = watch::channel(());
        let snapshots = Arc::new(Snapshots::default());
        let sync = Arc::new(SyncState::new());
        let relay = Relay {
            feed: feed.clone(),
            store_feed: store.feed_state(),
            store: Arc::clone(&store),
            snapshots: Arc::clone(&snapshots),
            clock: Arc::clone(clock),
            sync: Arc::clone(&sync),
        };
        tokio::spawn(relay.run(stopped));
        let inner = Inner { feed, clock: monotonic, store_feed: store.feed_state(), snapshots, sync, _stop: stop };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Whether the token with `jti` (and `sid`) may be used: `Err` with
    /// "token revoked" when it is on the deny set, or
    /// [`AuthError::RevocationFeed`] when the set cannot be trusted now.
    pub fn check(&self, jti: &str, sid: Option<&str>) -> Result<(), AuthError> {
        let now = self.inner.clock.now_unix();
        let answer = match self.inner.feed.check(jti, sid, now) {
            RevocationLookup::Ready(answer) => answer,
            // A feed answers from memory; anything else cannot be trusted.
            RevocationLookup::Pending(_) => Err(VerifyError::FeedStale),
        };
        match answer {
            Err(VerifyError::Revoked) => Err(AuthError::Unauthenticated("token revoked")),
            Err(_) => Err(AuthError::RevocationFeed("the deny set is not current")),
            Ok(()) => {
                let store = *self.inner.store_feed.borrow();
                if !store.live {
                    Err(AuthError::RevocationFeed("the store's revocation feed is not live"))
                } else if !self.inner.sync.complete_for(store) {
                    // Events may have been missed since the last snapshot:
                    // only the next one can say what they were.
                    Err(AuthError::RevocationFeed("the deny set is being re-read"))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Adds a revocation the store has acknowledged as durable (made on
    /// this replica), ahead of its own event. Families are not kept.
    pub fn insert(&self, r: &Revocation) {
        let kind = match r.kind {
            RevocationKind::Jti => RevokedKind::Jti,
            RevocationKind::Sid => RevokedKind::Sid,
            RevocationKind::Family => return,
        };
        self.inner.feed.insert(kind, &r.id, r.expires_at);
    }

    /// Waits up to `within` for the first complete snapshot; whether it
    /// came.
    pub async fn synced(&self, within: Duration) -> bool {
        tokio::time::timeout(within, self.inner.feed.wait_synced()).await.is_ok()
    }

    /// Whether checks are answered from the set now (rather than failing
    /// closed): its snapshot is in, heard from within [`STALE_AFTER`], and
    /// the store's feed is live.
    pub fn is_current(&self) -> bool {
        self.inner.feed.is_fresh() && self.inner.sync.complete_for(*self.inner.store_feed.borrow())
    }

    /// The deny set's state: entries, freshness, resyncs.
    pub fn stats(&self) -> FeedStats {
        self.inner.feed.stats()
    }

    /// The snapshot reads this replica shares with its watch streams.
    pub(crate) fn snapshots(&self) -> Arc<Snapshots> {
        Arc::clone(&self.inner.snapshots)
    }
}

/// The task that keeps the feed current.
struct Relay {
    feed: RevocationFeed,
    store_feed: watch::Receiver<FeedState>,
    store: Arc<dyn Store>,
    snapshots: Arc<Snapshots>,
    clock: SharedClock,
    sync: Arc<SyncState>,
}

/// Why the relay left a synced phase.
enum Resync {
    /// The store's feed is not live: wait until it is, then resync.
    NotLive,
    /// Events may have been missed: read a fresh snapshot now.
    Now,
    /// The store or the deny set is gone.
    Stop,
}

impl Relay {
    async fn run(mut self, mut stopped: watch::Receiver<()>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).jitter(0.5);
        loop {
            // Wait for a live store feed.
            let state = tokio::select! {
                s = self.store_feed.wait_for(|s| s.live) => match s {
                    Ok(s) => *s,
                    Err(_) => return,
                },
                _ = stopped.changed() => return,
            };
            // Subscribe before reading, so nothing falls between.
            let mut events = self.store.subscribe();
            self.feed.reconnected();
            let now = self.clock.now_unix();
            let read = tokio::select! {
                r = self.snapshots.get(&*self.store, now, state.epoch) => r,
                _ = stopped.changed() => return,
            };
            match read {
                Ok(snapshot) => {
                    backoff.reset();
                    self.apply(snapshot);
                    self.sync.epoch.store(state.epoch, Ordering::Release);
                    self.sync.behind.store(false, Ordering::Release);
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot read the deny list for the local set");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        _ = stopped.changed() => return,
                    }
                }
            }
            match self.follow(&mut events, state.epoch, &mut stopped).await {
                Resync::Stop => return,
                Resync::NotLive | Resync::Now => continue,
            }
        }
    }

    /// Applies a snapshot and the revocations made since its read.
    fn apply(&self, (chunks, since): Snapshot) {
        for chunk in chunks.iter() {
            self.feed.apply(chunk.clone());
        }
        for r in since {
            self.feed.apply(revoked(r));
        }
    }

    /// Applies events and heartbeats until the store's feed stops being
    /// live, moves to another epoch, or events are lost.
    async fn follow(
        &mut self,
        events: &mut tokio::sync::broadcast::Receiver<Revocation>,
        epoch: u64,
        stopped: &mut watch::Receiver<()>,
    ) -> Resync {
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stopped.changed() => return Resync::Stop,
                changed = self.store_feed.changed() => {
                    if changed.is_err() {
                        return Resync::Stop;
                    }
                    let state = *self.store_feed.borrow_and_update();
                    if !state.live {
                        tracing::warn!("store revocation feed not live: presented tokens fail closed");
                        return Resync::NotLive;
                    }
                    if state.epoch != epoch {
                        tracing::info!(epoch = state.epoch, "store revocation feed resynced; re-reading the deny list");
                        return Resync::Now;
                    }
                }
                ev = events.recv() => match ev {
                    Ok(r) => {
                        if let Some(r) = to_pb(&r) {
                            self.feed.apply(revoked(r));
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        // Checks fail closed until the re-read is in.
                        self.sync.behind.store(true, Ordering::Release);
                        tracing::warn!(missed, "local deny set lagged the store's events; re-reading the deny list");
                        return Resync::Now;
                    }
                    Err(RecvError::Closed) => return Resync::Stop,
                },
                _ = tick.tick() => {
                    if self.store_feed.borrow().live {
                        self.feed.apply(heartbeat());
                    }
                }
            }
        }
    }
}

fn heartbeat() -> pb::RevocationEvent {
    pb::RevocationEvent { event: Some(pb::revocation_event::Event::Heartbeat(pb::Heartbeat { server_time: 0 })) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::store::MemoryStore;

    fn jti(id: &str, expires_at: u64) -> Revocation {
        Revocation { kind: RevocationKind::Jti, id: id.into(), expires_at }
    }

    fn refused(r: Result<(), AuthError>) -> bool {
        matches!(r, Err(AuthError::Unauthenticated("token revoked")))
    }

    /// Lets the relay run until `done` holds (a few scheduler turns).
    async fn until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..1_000 {
            if done() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the relay never got to: {what}");
    }

    #[tokio::test]
    async fn the_store_feed_and_this_replicas_own_revocations_reach_the_set() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let clock: SharedClock = Arc::new(SystemClock);
        let now = clock.now_unix();
        store.revoke(jti("before", now + 60), now).await.unwrap();
        let set = Revocations::start(Arc::clone(&store), &clock).unwrap();
        assert!(matches!(set.check("j", None), Err(AuthError::RevocationFeed(_))), "fails closed until synced");
        assert!(set.synced(Duration::from_secs(5)).await);
        assert!(set.is_current());
        assert!(refused(set.check("before", None)), "from the snapshot");
        assert!(set.check("j", Some("s")).is_ok());

        // Published by the store (as another replica's would be).
        store
            .revoke(Revocation { kind: RevocationKind::Sid, id: "s".into(), expires_at: now + 60 }, now)
            .await
            .unwrap();
        until("the sid event", || refused(set.check("j", Some("s")))).await;
        // Made here: inserted at once, before the relay runs again.
        set.insert(&jti("mine", now + 60));
        assert!(refused(set.check("mine", None)));
        // Families concern no token check.
        set.insert(&Revocation { kind: RevocationKind::Family, id: "f".into(), expires_at: now + 60 });
        assert_eq!(set.stats().entries, 3);
    }

    #[tokio::test]
    async fn a_relay_that_falls_behind_the_store_rereads_the_deny_list() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let clock: SharedClock = Arc::new(SystemClock);
        let now = clock.now_unix();
        let set = Revocations::start(Arc::clone(&store), &clock).unwrap();
        assert!(set.synced(Duration::from_secs(5)).await);
        // More than the store's broadcast holds, before the relay runs:
        // it lags, and only a fresh snapshot can tell it what it missed.
        const MANY: usize = 5_000;
        for i in 0..MANY {
            store.revoke(jti(&format!("j{i}"), now + 60), now).await.unwrap();
        }
        until("every revocation", || set.stats().entries == MANY).await;
        assert!(refused(set.check("j0", None)), "the first one, lost from the broadcast");
        assert!(refused(set.check(&format!("j{}", MANY - 1), None)));
        assert!(set.is_current());
    }

    #[tokio::test]
    async fn a_new_epoch_fails_checks_closed_until_its_snapshot_is_applied() {
        let memory = Arc::new(MemoryStore::new());
        let store: Arc<dyn Store> = Arc::clone(&memory) as Arc<dyn Store>;
        let clock: SharedClock = Arc::new(SystemClock);
        let set = Revocations::start(Arc::clone(&store), &clock).unwrap();
        assert!(set.synced(Duration::from_secs(5)).await);
        assert!(set.check("j", None).is_ok());
        // The store's subscriber came back after a gap: live, but events
        // may have been missed. Heartbeats are recent, yet until the relay
        // has read and applied a snapshot of the new epoch nothing passes.
        memory.set_feed_state(FeedState { live: true, epoch: 1 });
        assert!(matches!(set.check("j", None), Err(AuthError::RevocationFeed(_))), "{:?}", set.check("j", None));
        assert!(!set.is_current());
        until("the new epoch's snapshot", || set.check("j", None).is_ok()).await;
        assert!(set.is_current());
    }
}
