//! What a [`Verifier`](super::Verifier) reports: every outcome goes to one
//! [`VerifyObserver`], set with
//! [`VerifierBuilder::observer`](super::VerifierBuilder::observer).
//!
//! Each verification, whether it is asked for through the tower layer or
//! through [`Verifier::verify`](super::Verifier::verify), ends in exactly
//! one [`VerifyEvent::Verified`], emitted from one place in the verifier.
//! The key cache and the revocation feed report their own events to the
//! same observer. [`Verifier::stats`](super::Verifier::stats) is itself an
//! observer of these events, so the counters it returns and what a custom
//! observer sees cannot disagree; so are the SDK's metrics (feature
//! `metrics`, listed in the crate docs).
//!
//! Observers are called on the request path: they take `&self`, get an
//! event that borrows instead of allocating, and should do no more than
//! bump counters or set gauges. Every label an event carries (a
//! [`VerifyError::reason`], a [`JwksError::reason`], the enums below) is
//! from a fixed set, never from the token or the request.
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use service_sdk::verify::{VerifyEvent, VerifyObserver};
//!
//! /// Counts refusals the verifier itself is responsible for.
//! #[derive(Default)]
//! struct Unavailable(AtomicU64);
//!
//! impl VerifyObserver for Unavailable {
//!     fn on_event(&self, event: &VerifyEvent<'_>) {
//!         if let VerifyEvent::Verified { result: Err(e), .. } = event
//!             && e.is_unavailable()
//!         {
//!             self.0.fetch_add(1, Ordering::Relaxed);
//!         }
//!     }
//! }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::VerifyError;
use super::jwks::JwksError;
use crate::metrics::VerifyMetrics;

/// Receives every [`VerifyEvent`] of a verifier. Called synchronously
/// where the event happens (often on the request path): keep it cheap and
/// never block.
pub trait VerifyObserver: Send + Sync + 'static {
    /// One event.
    fn on_event(&self, event: &VerifyEvent<'_>);
}

impl<T: VerifyObserver + ?Sized> VerifyObserver for Arc<T> {
    fn on_event(&self, event: &VerifyEvent<'_>) {
        (**self).on_event(event);
    }
}

/// Something a verifier, its key cache or its revocation feed did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerifyEvent<'a> {
    /// A verification finished: exactly one per [`Verifier::verify`] call
    /// and per request the layer checks (requests on an
    /// `allow_unauthenticated` path are not verified).
    ///
    /// [`Verifier::verify`]: super::Verifier::verify
    Verified {
        /// Accepted, or refused and why.
        result: Result<(), VerifyError>,
        /// Whether the verified-token cache answered.
        cache: CacheUse,
    },
    /// A key set was fetched and is now in use.
    JwksRefreshed {
        /// Number of keys in the new set.
        keys: usize,
        /// Why it was fetched.
        trigger: JwksTrigger,
    },
    /// A key fetch failed; the last good keys, if any, stay in use.
    JwksRefreshFailed {
        /// What went wrong (its [`JwksError::reason`] is a fixed label).
        error: &'a JwksError,
        /// Why it was fetched.
        trigger: JwksTrigger,
    },
    /// The `WatchRevocations` stream opened.
    FeedConnected,
    /// The `WatchRevocations` stream ended or failed; it is reopened with
    /// back-off.
    FeedDisconnected,
    /// A complete revocation snapshot (sent on every connect, possibly in
    /// chunks, and again when the server re-reads its store) took effect:
    /// it became the deny set, with the still-live entries the feed held
    /// before (a revocation is never lifted).
    FeedSnapshot {
        /// `jti`s and `sid`s held after it.
        entries: usize,
    },
    /// The feed heard from the auth service (snapshot, revocation or
    /// heartbeat): the staleness clock restarts at `at`.
    FeedHeard {
        /// Unix seconds, by the verifier's clock.
        at: u64,
    },
    /// The feed has been silent past its stale bound (and, with
    /// [`StalePolicy::ServeLastKnown`], past its `up_to` too), or has had
    /// no snapshot yet, so verifications fail closed with
    /// [`VerifyError::FeedStale`]. Reported once per silence, when a check
    /// first finds it; [`VerifyEvent::FeedHeard`] ends it.
    ///
    /// [`StalePolicy::ServeLastKnown`]: super::StalePolicy::ServeLastKnown
    FeedStale,
    /// The feed has been silent past its stale bound and, as
    /// [`StalePolicy::ServeLastKnown`] says, answers from its last known
    /// deny set until `until`; then [`VerifyEvent::FeedStale`]. Reported
    /// once per silence, when a check first finds it (and logged as a
    /// warning); [`VerifyEvent::FeedHeard`] ends it.
    ///
    /// [`StalePolicy::ServeLastKnown`]: super::StalePolicy::ServeLastKnown
    FeedServingStale {
        /// Unix seconds, by the verifier's clock, after which checks fail
        /// closed unless the feed is heard from.
        until: u64,
    },
    /// One revocation check was answered "not revoked" from the last
    /// known deny set of a stale feed: revocations made since it went
    /// silent are not seen. Reported for every such answer, before the
    /// verification's [`VerifyEvent::Verified`].
    ServedStale,
}

/// Where a revocation feed stands (see [`FeedStats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FeedHealth {
    /// No complete snapshot yet: checks fail closed.
    #[default]
    Syncing,
    /// Heard from within the stale bound: checks answer from the deny set.
    Fresh,
    /// Silent past the stale bound (and any serve-stale window): checks
    /// fail closed with [`VerifyError::FeedStale`].
    Stale,
    /// Silent past the stale bound, within the `up_to` of
    /// [`StalePolicy::ServeLastKnown`](super::StalePolicy::ServeLastKnown):
    /// checks answer from the last known deny set.
    ServingStale,
}

impl FeedHealth {
    /// A short stable label, for metrics.
    pub fn label(self) -> &'static str {
        match self {
            FeedHealth::Syncing => "syncing",
            FeedHealth::Fresh => "fresh",
            FeedHealth::Stale => "stale",
            FeedHealth::ServingStale => "serving_stale",
        }
    }
}

/// The state of a verifier's revocation feed, read when asked (from
/// atomics: cheap, and never in the way of checks).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FeedStats {
    /// Where the feed stands now, by the verifier's clock.
    pub health: FeedHealth,
    /// Seconds since the feed was last heard from (a message on a stream
    /// whose snapshot was complete); `None` before the first snapshot.
    pub silent_for_secs: Option<u64>,
    /// `jti`s and `sid`s in the deny set.
    pub entries: usize,
    /// Streams opened after the first one.
    pub reconnects: u64,
    /// Times the feed, once synced, went silent past its stale bound.
    pub stale_episodes: u64,
    /// Checks answered from the last known deny set while stale
    /// ([`VerifyEvent::ServedStale`]).
    pub served_stale: u64,
}

/// How a verification used the verified-token cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CacheUse {
    /// Answered from the cache: no signature was checked.
    Hit,
    /// Not in the cache (or the cache is disabled): checked against the keys.
    Miss,
    /// Refused before the cache was asked: no bearer token, or one over the
    /// size limit.
    Bypassed,
}

/// Why the key cache fetched the key set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JwksTrigger {
    /// No keys yet: the start-up load and its retries.
    Initial,
    /// The periodic background refresh (and its retries).
    Scheduled,
    /// A token named a `kid` the cache does not hold.
    UnknownKid,
}

impl CacheUse {
    /// A short stable label, for metrics.
    pub fn label(self) -> &'static str {
        match self {
            CacheUse::Hit => "hit",
            CacheUse::Miss => "miss",
            CacheUse::Bypassed => "bypassed",
        }
    }
}

impl JwksTrigger {
    /// A short stable label, for metrics.
    pub fn label(self) -> &'static str {
        match self {
            JwksTrigger::Initial => "initial",
            JwksTrigger::Scheduled => "scheduled",
            JwksTrigger::UnknownKid => "unknown_kid",
        }
    }
}

/// Counters of a [`Verifier`](super::Verifier) since it was built.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifierStats {
    /// Tokens accepted.
    pub accepted: u64,
    /// Verifications answered from the verified-token cache.
    pub cache_hits: u64,
    /// Verifications that went to the keys (a signature check).
    pub cache_misses: u64,
    /// Refusals by [`VerifyError::reason`], only reasons seen at least once.
    pub rejected: Vec<(&'static str, u64)>,
    /// The revocation feed's state; `None` when the revocation check has
    /// no feed (e.g. a per-request Redis lookup).
    pub feed: Option<FeedStats>,
}

impl VerifierStats {
    /// Refusals for one reason label.
    pub fn rejected(&self, reason: &str) -> u64 {
        self.rejected.iter().find(|(r, _)| *r == reason).map_or(0, |(_, n)| *n)
    }
}

/// The observer behind [`Verifier::stats`](super::Verifier::stats).
#[derive(Default)]
struct Stats {
    accepted: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    rejected: [AtomicU64; VerifyError::ALL.len()],
}

impl VerifyObserver for Stats {
    fn on_event(&self, event: &VerifyEvent<'_>) {
        let VerifyEvent::Verified { result, cache } = event else { return };
        match cache {
            CacheUse::Hit => self.hits.fetch_add(1, Ordering::Relaxed),
            CacheUse::Miss => self.misses.fetch_add(1, Ordering::Relaxed),
            CacheUse::Bypassed => 0,
        };
        match result {
            Ok(()) => self.accepted.fetch_add(1, Ordering::Relaxed),
            Err(e) => self.rejected.get(e.index()).map_or(0, |n| n.fetch_add(1, Ordering::Relaxed)),
        };
    }
}

impl Stats {
    fn snapshot(&self) -> VerifierStats {
        let rejected = VerifyError::ALL
            .iter()
            .zip(self.rejected.iter())
            .map(|(e, n)| (e.reason(), n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect();
        VerifierStats {
            accepted: self.accepted.load(Ordering::Relaxed),
            cache_hits: self.hits.load(Ordering::Relaxed),
            cache_misses: self.misses.load(Ordering::Relaxed),
            rejected,
            feed: None,
        }
    }
}

/// Where a verifier and its parts send events: the built-in counters, the
/// metrics (feature `metrics`; nothing otherwise), then the observer set in
/// the builder, if any.
pub(crate) struct Reporter {
    stats: Stats,
    metrics: VerifyMetrics,
    observer: Option<Box<dyn VerifyObserver>>,
}

impl Reporter {
    pub(crate) fn new(metrics: VerifyMetrics, observer: Option<Box<dyn VerifyObserver>>) -> Self {
        Self { stats: Stats::default(), metrics, observer }
    }

    pub(crate) fn stats(&self) -> VerifierStats {
        self.stats.snapshot()
    }

    pub(crate) fn metrics(&self) -> &VerifyMetrics {
        &self.metrics
    }
}

impl VerifyObserver for Reporter {
    fn on_event(&self, event: &VerifyEvent<'_>) {
        self.stats.on_event(event);
        self.metrics.on_event(event);
        if let Some(observer) = &self.observer {
            observer.on_event(event);
        }
    }
}

/// An observer that keeps every event, for tests.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Recorder(std::sync::Mutex<Vec<String>>);

#[cfg(test)]
impl Recorder {
    /// The events so far, as their `Debug` text, and forgets them.
    pub(crate) fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[cfg(test)]
impl VerifyObserver for Recorder {
    fn on_event(&self, event: &VerifyEvent<'_>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(format!("{event:?}"));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn reporter_counts_verifications_and_forwards_every_event() {
        let recorder = Arc::new(Recorder::default());
        let reporter = Reporter::new(VerifyMetrics::new("inventory"), Some(Box::new(recorder.clone())));
        let events = [
            VerifyEvent::Verified { result: Ok(()), cache: CacheUse::Miss },
            VerifyEvent::Verified { result: Ok(()), cache: CacheUse::Hit },
            VerifyEvent::Verified { result: Err(VerifyError::Expired), cache: CacheUse::Hit },
            VerifyEvent::Verified { result: Err(VerifyError::Missing), cache: CacheUse::Bypassed },
            VerifyEvent::FeedHeard { at: 1 },
            VerifyEvent::JwksRefreshFailed { error: &JwksError::Timeout, trigger: JwksTrigger::Initial },
        ];
        for e in &events {
            reporter.on_event(e);
        }
        assert_eq!(recorder.take().len(), events.len());
        let stats = reporter.stats();
        assert_eq!((stats.accepted, stats.cache_hits, stats.cache_misses), (2, 2, 1));
        assert_eq!((stats.rejected("expired"), stats.rejected("missing"), stats.rejected.len()), (1, 1, 2));
    }

    #[test]
    fn labels_are_fixed_and_distinct() {
        let cache: Vec<_> = [CacheUse::Hit, CacheUse::Miss, CacheUse::Bypassed].map(CacheUse::label).into();
        assert_eq!(cache, ["hit", "miss", "bypassed"]);
        let triggers = [JwksTrigger::Initial, JwksTrigger::Scheduled, JwksTrigger::UnknownKid].map(JwksTrigger::label);
        assert_eq!(triggers, ["initial", "scheduled", "unknown_kid"]);
        let health = [FeedHealth::Syncing, FeedHealth::Fresh, FeedHealth::Stale, FeedHealth::ServingStale];
        assert_eq!(health.map(FeedHealth::label), ["syncing", "fresh", "stale", "serving_stale"]);
    }
}
