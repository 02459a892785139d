//! The SDK's metrics, through the `metrics` facade (feature `metrics`; the
//! names, labels and meaning are listed in the crate docs, "Metrics").
//!
//! They attach where the SDK already counts, never in the flows:
//!
//! - the reporter of a verifier (`verify::observe`) hands every
//!   [`VerifyEvent`](crate::VerifyEvent) to a [`VerifyMetrics`] next to its
//!   own counters ([`VerifierStats`](crate::VerifierStats)), and the
//!   verifier runs one [`FeedTicker`] that keeps the revocation feed's
//!   staleness current;
//! - a token source's counters ([`TokenSourceStats`](crate::TokenSourceStats))
//!   report to a [`SourceMetrics`].
//!
//! The verify hot path touches only handles registered when the verifier
//! is built (one atomic add each, no allocation, no lookup). The rarer
//! events (key refreshes, the feed, token exchanges) register their series
//! when they happen.
//!
//! Labels come from fixed sets ([`VerifyError::reason`](crate::VerifyError::reason),
//! `JwksError::reason`, [`TokenError::label`](crate::TokenError::label), the
//! event enums) and from audiences the service itself configures: a
//! verifier's own audience, and the audiences a token source is asked for
//! (at most [`MAX_AUDIENCE_LABELS`] per source; the rest are counted as
//! [`OTHER_AUDIENCE`]).
//!
//! Handles are bound to the recorder installed when they are registered:
//! install the exporter's recorder before building verifiers and token
//! sources.
//!
//! Without the feature every type here is empty and every method an inline
//! no-op.

pub(crate) use imp::{FeedTicker, SourceMetrics, VerifyMetrics};

/// Distinct audiences one token source labels its series with; further
/// audiences share the label [`OTHER_AUDIENCE`].
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) const MAX_AUDIENCE_LABELS: usize = 64;

/// The audience label of a token source's series past
/// [`MAX_AUDIENCE_LABELS`] audiences.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) const OTHER_AUDIENCE: &str = "_other";

/// Metric names (documented in the crate docs).
#[cfg(feature = "metrics")]
mod names {
    pub(super) const VERIFICATIONS: &str = "auth_sdk_verifications_total";
    pub(super) const CACHE_HITS: &str = "auth_sdk_verify_cache_hits_total";
    pub(super) const CACHE_MISSES: &str = "auth_sdk_verify_cache_misses_total";
    pub(super) const JWKS_REFRESHES: &str = "auth_sdk_jwks_refreshes_total";
    pub(super) const FEED_CONNECTED: &str = "auth_sdk_revocation_feed_connected";
    pub(super) const FEED_CONNECTS: &str = "auth_sdk_revocation_feed_connects_total";
    pub(super) const FEED_STALENESS: &str = "auth_sdk_revocation_feed_staleness_seconds";
    pub(super) const FEED_LAST_HEARD: &str = "auth_sdk_revocation_feed_last_heard_timestamp_seconds";
    pub(super) const FEED_ENTRIES: &str = "auth_sdk_revocation_feed_entries";
    pub(super) const SERVED_STALE: &str = "auth_sdk_revocation_served_stale_total";
    pub(super) const EXCHANGES: &str = "auth_sdk_token_exchanges_total";
    pub(super) const RENEWALS: &str = "auth_sdk_token_renewals_total";
    pub(super) const WAITS: &str = "auth_sdk_token_waits_total";
}

#[cfg(feature = "metrics")]
mod imp {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock, Weak};
    use std::time::Duration;

    use ::metrics::{Counter, Gauge, SharedString, Unit, counter, describe_counter, describe_gauge, gauge};

    use super::names::*;
    use super::{MAX_AUDIENCE_LABELS, OTHER_AUDIENCE};
    use crate::verify::{CacheUse, RevocationCheck, VerifyError, VerifyEvent};
    use crate::{Clock, TokenError};

    /// How often a verifier's [`FeedTicker`] sets the staleness gauge.
    const STALENESS_PERIOD: Duration = Duration::from_secs(1);

    /// Describes every metric to the recorder. Called by each constructor
    /// (a recorder installed after the first verifier was built still
    /// learns the descriptions); describing again only repeats the same
    /// text.
    fn describe() {
        describe_counter!(
            VERIFICATIONS,
            Unit::Count,
            "Verifications by a verifier (label audience: its own): outcome accepted, refused (the token's fault) or \
             unavailable (no keys, stale feed), with the refusal's reason"
        );
        describe_counter!(CACHE_HITS, Unit::Count, "Verifications answered from the verified-token cache");
        describe_counter!(CACHE_MISSES, Unit::Count, "Verifications that checked a signature (not in the cache)");
        describe_counter!(
            JWKS_REFRESHES,
            Unit::Count,
            "Key set fetches by trigger (initial, scheduled, unknown_kid) and outcome (ok, failed with a reason)"
        );
        describe_gauge!(FEED_CONNECTED, "1 while the WatchRevocations stream is open, else 0");
        describe_counter!(FEED_CONNECTS, Unit::Count, "WatchRevocations streams opened");
        describe_gauge!(
            FEED_STALENESS,
            Unit::Seconds,
            "Seconds since the revocation feed was last heard from (since the verifier started before its first \
             snapshot); updated every second"
        );
        describe_gauge!(
            FEED_LAST_HEARD,
            Unit::Seconds,
            "Unix time the revocation feed was last heard from (snapshot, revocation or heartbeat)"
        );
        describe_gauge!(FEED_ENTRIES, Unit::Count, "Revoked jti and sid held in the deny set");
        describe_counter!(
            SERVED_STALE,
            Unit::Count,
            "Revocation checks answered from the last known deny set of a stale feed (StalePolicy::ServeLastKnown)"
        );
        describe_counter!(
            EXCHANGES,
            Unit::Count,
            "Token exchanges sent by a token source, by target audience and outcome (ok or the error's label)"
        );
        describe_counter!(RENEWALS, Unit::Count, "Token exchanges sent by the background renewer");
        describe_counter!(
            WAITS,
            Unit::Count,
            "Token requests that found no valid cached token and waited for an exchange"
        );
    }

    /// The outcome label of a refusal.
    fn outcome_of(e: VerifyError) -> &'static str {
        if e.is_unavailable() { "unavailable" } else { "refused" }
    }

    /// The metrics of one verifier, labelled with its own audience.
    pub(crate) struct VerifyMetrics {
        audience: SharedString,
        accepted: Counter,
        /// By [`VerifyError::index`].
        refused: [Counter; VerifyError::ALL.len()],
        cache_hits: Counter,
        cache_misses: Counter,
        /// Registered with the first feed event: a verifier without a feed
        /// (a per-request Redis lookup) has no feed series.
        feed: OnceLock<FeedMetrics>,
    }

    #[derive(Clone)]
    struct FeedMetrics {
        connected: Gauge,
        connects: Counter,
        staleness: Gauge,
        last_heard: Gauge,
        entries: Gauge,
        served_stale: Counter,
    }

    impl VerifyMetrics {
        /// Registers the verification series of a verifier for `audience`
        /// (all at zero until counted).
        pub(crate) fn new(audience: &str) -> Self {
            describe();
            let audience = SharedString::from(Arc::<str>::from(audience));
            let a = || audience.clone();
            let refused = std::array::from_fn(|i| {
                let e = VerifyError::ALL[i];
                counter!(VERIFICATIONS, "audience" => a(), "outcome" => outcome_of(e), "reason" => e.reason())
            });
            Self {
                accepted: counter!(VERIFICATIONS, "audience" => a(), "outcome" => "accepted"),
                refused,
                cache_hits: counter!(CACHE_HITS, "audience" => a()),
                cache_misses: counter!(CACHE_MISSES, "audience" => a()),
                feed: OnceLock::new(),
                audience,
            }
        }

        fn feed(&self) -> &FeedMetrics {
            self.feed.get_or_init(|| {
                let a = || self.audience.clone();
                FeedMetrics {
                    connected: gauge!(FEED_CONNECTED, "audience" => a()),
                    connects: counter!(FEED_CONNECTS, "audience" => a()),
                    staleness: gauge!(FEED_STALENESS, "audience" => a()),
                    last_heard: gauge!(FEED_LAST_HEARD, "audience" => a()),
                    entries: gauge!(FEED_ENTRIES, "audience" => a()),
                    served_stale: counter!(SERVED_STALE, "audience" => a()),
                }
            })
        }

        /// Counts one event.
        #[inline]
        pub(crate) fn on_event(&self, event: &VerifyEvent<'_>) {
            match event {
                VerifyEvent::Verified { result, cache } => {
                    match cache {
                        CacheUse::Hit => self.cache_hits.increment(1),
                        CacheUse::Miss => self.cache_misses.increment(1),
                        CacheUse::Bypassed => {}
                    }
                    match result {
                        Ok(()) => self.accepted.increment(1),
                        Err(e) => {
                            if let Some(c) = self.refused.get(e.index()) {
                                c.increment(1);
                            }
                        }
                    }
                }
                other => self.on_rare_event(other),
            }
        }

        /// Everything but verifications: key refreshes and the feed.
        #[cold]
        fn on_rare_event(&self, event: &VerifyEvent<'_>) {
            let audience = self.audience.clone();
            match event {
                VerifyEvent::JwksRefreshed { trigger, .. } => {
                    counter!(JWKS_REFRESHES, "audience" => audience, "trigger" => trigger.label(), "outcome" => "ok")
                        .increment(1);
                }
                VerifyEvent::JwksRefreshFailed { error, trigger } => {
                    let (trigger, reason) = (trigger.label(), error.reason());
                    counter!(
                        JWKS_REFRESHES,
                        "audience" => audience, "trigger" => trigger, "outcome" => "failed", "reason" => reason
                    )
                    .increment(1);
                }
                VerifyEvent::FeedConnected => {
                    let feed = self.feed();
                    feed.connected.set(1.0);
                    feed.connects.increment(1);
                }
                VerifyEvent::FeedDisconnected => self.feed().connected.set(0.0),
                VerifyEvent::FeedHeard { at } => self.feed().last_heard.set(*at as f64),
                VerifyEvent::ServedStale => self.feed().served_stale.increment(1),
                _ => {}
            }
        }

        /// Keeps the feed's staleness and deny-set size current: a task
        /// reads `check`'s [`feed_stats`](RevocationCheck::feed_stats)
        /// every second, on the verifier's clock. `None` when the check has
        /// no feed. The task ends when the ticker is dropped (with the
        /// verifier) or the check is gone.
        pub(crate) fn watch_feed(&self, check: &Arc<dyn RevocationCheck>, clock: Arc<dyn Clock>) -> Option<FeedTicker> {
            check.feed_stats()?;
            let feed = self.feed().clone();
            let check: Weak<dyn RevocationCheck> = Arc::downgrade(check);
            let started = clock.now_unix();
            let task = tokio::spawn(async move {
                let mut every = tokio::time::interval(STALENESS_PERIOD);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    let Some(stats) = check.upgrade().and_then(|c| c.feed_stats()) else { return };
                    // Before its first snapshot the feed has been silent
                    // since the verifier started.
                    let silent = stats.silent_for_secs.unwrap_or_else(|| clock.now_unix().saturating_sub(started));
                    feed.staleness.set(silent as f64);
                    feed.entries.set(stats.entries as f64);
                }
            });
            Some(FeedTicker(task))
        }
    }

    /// The task that keeps a feed's staleness gauge current; stops when
    /// dropped.
    pub(crate) struct FeedTicker(tokio::task::JoinHandle<()>);

    impl Drop for FeedTicker {
        fn drop(&mut self) {
            self.0.abort();
        }
    }

    /// The metrics of one token source, labelled with the target audience.
    pub(crate) struct SourceMetrics {
        /// The label of each audience seen, at most
        /// [`MAX_AUDIENCE_LABELS`].
        audiences: Mutex<HashMap<Box<str>, SharedString>>,
    }

    impl Default for SourceMetrics {
        fn default() -> Self {
            describe();
            Self { audiences: Mutex::new(HashMap::new()) }
        }
    }

    impl SourceMetrics {
        /// The label of `audience`: itself for the first
        /// [`MAX_AUDIENCE_LABELS`] audiences, then [`OTHER_AUDIENCE`].
        pub(crate) fn audience_label(&self, audience: &str) -> SharedString {
            let mut seen = self.audiences.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(label) = seen.get(audience) {
                return label.clone();
            }
            if seen.len() >= MAX_AUDIENCE_LABELS {
                return SharedString::const_str(OTHER_AUDIENCE);
            }
            let label = SharedString::from(Arc::<str>::from(audience));
            seen.insert(audience.into(), label.clone());
            label
        }

        /// One exchange sent for `audience` ended with `result`.
        pub(crate) fn exchanged(&self, audience: &str, result: Result<(), &TokenError>) {
            let outcome = result.map_or_else(TokenError::label, |()| "ok");
            counter!(EXCHANGES, "audience" => self.audience_label(audience), "outcome" => outcome).increment(1);
        }

        /// The renewer sends an exchange for `audience`.
        pub(crate) fn renewing(&self, audience: &str) {
            counter!(RENEWALS, "audience" => self.audience_label(audience)).increment(1);
        }

        /// A request for `audience` found no valid cached token.
        pub(crate) fn waited(&self, audience: &str) {
            counter!(WAITS, "audience" => self.audience_label(audience)).increment(1);
        }
    }

    #[cfg(test)]
    #[allow(clippy::unwrap_used, clippy::expect_used)]
    mod tests {
        use super::*;

        #[test]
        fn a_token_source_labels_at_most_max_audiences_and_counts_the_rest_as_other() {
            let m = SourceMetrics::default();
            for i in 0..MAX_AUDIENCE_LABELS {
                assert_eq!(m.audience_label(&format!("aud-{i}")).as_ref(), format!("aud-{i}"));
            }
            assert_eq!(m.audience_label("one-too-many").as_ref(), OTHER_AUDIENCE);
            assert_eq!(m.audience_label("aud-0").as_ref(), "aud-0", "known audiences keep their label");
            assert_eq!(m.audiences.lock().unwrap().len(), MAX_AUDIENCE_LABELS);
        }

        #[test]
        fn refusals_are_unavailable_exactly_when_the_verifier_is_at_fault() {
            for e in VerifyError::ALL {
                assert_eq!(outcome_of(e) == "unavailable", e.is_unavailable(), "{e:?}");
            }
        }
    }
}

#[cfg(not(feature = "metrics"))]
mod imp {
    use std::sync::Arc;

    use crate::verify::{RevocationCheck, VerifyEvent};
    use crate::{Clock, TokenError};

    /// No metrics: the feature is off.
    pub(crate) struct VerifyMetrics;

    impl VerifyMetrics {
        #[inline(always)]
        pub(crate) fn new(_audience: &str) -> Self {
            Self
        }

        #[inline(always)]
        pub(crate) fn on_event(&self, _event: &VerifyEvent<'_>) {}

        #[inline(always)]
        pub(crate) fn watch_feed(
            &self,
            _check: &Arc<dyn RevocationCheck>,
            _clock: Arc<dyn Clock>,
        ) -> Option<FeedTicker> {
            None
        }
    }

    /// Never made: without the feature nothing ticks.
    pub(crate) enum FeedTicker {}

    /// No metrics: the feature is off.
    #[derive(Default)]
    pub(crate) struct SourceMetrics;

    impl SourceMetrics {
        #[inline(always)]
        pub(crate) fn exchanged(&self, _audience: &str, _result: Result<(), &TokenError>) {}

        #[inline(always)]
        pub(crate) fn renewing(&self, _audience: &str) {}

        #[inline(always)]
        pub(crate) fn waited(&self, _audience: &str) {}
    }
}
