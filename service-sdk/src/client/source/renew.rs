//! Background renewal: when a token is renewed ([`refresh_in`], pure) and
//! the task that renews service tokens and drops idle and expired entries.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::Inner;
use super::slot::Slot;

/// Where in a token's life it is renewed: at `fraction` of it, moved by up
/// to `± jitter` (both fractions of the life).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct RenewPoint {
    pub(super) fraction: f64,
    pub(super) jitter: f64,
}

impl Default for RenewPoint {
    /// 75% of the life, ± 5%.
    fn default() -> Self {
        Self { fraction: 0.75, jitter: 0.05 }
    }
}

/// How long after `issued_at` a token that expires at `expires_at` (Unix
/// seconds) is renewed: at `point.fraction` of its life, plus
/// `point.jitter * (2 * unit - 1)` of it (`unit` is a random number in
/// `[0, 1]`), and in any case at least one second before it stops being
/// served, `margin` before expiry. Whole seconds, never negative, never
/// past the life.
pub(super) fn refresh_in(issued_at: u64, expires_at: u64, margin: u64, point: RenewPoint, unit: f64) -> Duration {
    let life = expires_at.saturating_sub(issued_at);
    let fraction = point.fraction + point.jitter * (2.0 * unit - 1.0);
    // A NaN fraction (from a NaN input) stays NaN through `clamp` and casts
    // to 0: renew at once rather than never.
    let renew_in = ((life as f64) * fraction.clamp(0.0, 1.0)) as u64;
    Duration::from_secs(renew_in.min(life.saturating_sub(margin.saturating_add(1))))
}

/// Whether a token to be renewed at `renew_at` (and expiring at
/// `expires_at`) goes along with a batch renewal at `now`: it is within
/// half its renewal window (`renew_at..expires_at`) of its own point, so
/// it is renewed a little early rather than alone a little later.
pub(super) fn due_soon(now: u64, renew_at: u64, expires_at: u64) -> bool {
    let window = expires_at.saturating_sub(renew_at) / 2;
    now.saturating_add(window) >= renew_at
}

impl Inner {
    /// Renews the service tokens of `slots` in batches, skipping those a
    /// caller is fetching and those another renewal already renewed.
    async fn renew_batch(&self, slots: &[Arc<Slot>]) {
        let now = self.clock.now_unix();
        let mut guards = Vec::with_capacity(slots.len());
        let mut mine = Vec::with_capacity(slots.len());
        for slot in slots {
            let Ok(guard) = slot.flight.try_lock() else { continue };
            let current = slot.current.load();
            let stale = current.as_ref().is_none_or(|c| !c.valid(now) || due_soon(now, c.renew_at, c.expires_at));
            if stale {
                guards.push(guard);
                mine.push(Arc::clone(slot));
            }
        }
        self.exchange_batch(&mine, true).await;
        tracing::debug!(tokens = mine.len(), "tokens renewed in one batch");
        drop(guards);
    }

    /// Renews one service token in the background, unless a caller is
    /// already fetching it.
    async fn renew(&self, slot: &Slot) {
        let Ok(_flight) = slot.flight.try_lock() else { return };
        let now = self.clock.now_unix();
        let current = slot.current.load();
        let declared = || self.cfg.audiences.iter().any(|a| **a == *slot.audience);
        let due = match current.as_ref() {
            Some(c) => now >= c.renew_at || (!c.valid(now) && declared()),
            None => declared(),
        };
        if !due {
            return;
        }
        if let Ok(t) = self.exchange_into(slot, None, true).await {
            tracing::debug!(audience = %slot.audience, expires_at = t.expires_at(), "token renewed");
        }
    }
}

/// The background renewer: every `tick`, renews service tokens past their
/// renewal point (whose back-off has elapsed) and drops idle and expired
/// entries. Stops when the source is dropped.
pub(super) async fn renewer(inner: Weak<Inner>, tick: Duration) {
    loop {
        tokio::time::sleep(tick).await;
        let Some(inner) = inner.upgrade() else { return };
        let now = inner.clock.now_unix();
        let now_ms = inner.clock.now_millis();
        let mut due = Vec::new();
        let mut soon = Vec::new();
        let mut stale = Vec::new();
        {
            // A read lock: callers on the hot path are never blocked by the scan.
            let map = inner.service.read().unwrap_or_else(|e| e.into_inner());
            for (audience, s) in map.iter() {
                let used = s.last_used.load(Ordering::Relaxed);
                let idle = now.saturating_sub(used) > inner.cfg.idle_timeout;
                let current = s.current.load();
                if idle {
                    // Drop an idle slot once its token is no longer valid.
                    if !current.as_ref().is_some_and(|c| c.valid(now)) {
                        stale.push(audience.clone());
                    }
                    continue;
                }
                if !s.lock_retry().ready(now_ms) || s.renewing.load(Ordering::Relaxed) != 0 {
                    continue;
                }
                // A declared audience without a token (its start-up fetch
                // failed) is retried here, as its back-off allows.
                let declared = || inner.cfg.audiences.iter().any(|a| **a == **audience);
                match current.as_ref() {
                    Some(c) if now >= c.renew_at => due.push(Arc::clone(s)),
                    Some(c) if c.valid(now) && due_soon(now, c.renew_at, c.expires_at) => soon.push(Arc::clone(s)),
                    Some(c) if !c.valid(now) && declared() => due.push(Arc::clone(s)),
                    None if declared() => due.push(Arc::clone(s)),
                    _ => {}
                }
            }
        }
        if !stale.is_empty() {
            let mut map = inner.service.write().unwrap_or_else(|e| e.into_inner());
            for audience in stale {
                map.remove(&audience);
            }
        }
        let expired_delegated = {
            let map = inner.delegated.read().unwrap_or_else(|e| e.into_inner());
            map.values().any(|s| !s.holds_valid(now))
        };
        if expired_delegated {
            let mut map = inner.delegated.write().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, s| s.holds_valid(now) || s.flight.try_lock().is_err());
        }
        if due.is_empty() {
            continue;
        }
        if inner.batch.is_some() {
            // Renewing anyway: the tokens due soon go along in the same call.
            due.append(&mut soon);
        }
        if due.len() > 1 && inner.batch.is_some() {
            for slot in &due {
                slot.renewing.fetch_add(1, Ordering::Relaxed);
            }
            let inner = Arc::clone(&inner);
            tokio::spawn(async move {
                inner.renew_batch(&due).await;
                for slot in &due {
                    slot.renewing.fetch_sub(1, Ordering::Relaxed);
                }
            });
            continue;
        }
        for slot in due {
            slot.renewing.fetch_add(1, Ordering::Relaxed);
            let inner = Arc::clone(&inner);
            tokio::spawn(async move {
                inner.renew(&slot).await;
                slot.renewing.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const SECS: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn renewal_is_at_three_quarters_of_the_life_without_jitter() {
        let point = RenewPoint::default();
        assert_eq!(refresh_in(1_000, 1_400, 5, point, 0.5), SECS(300));
        // The jitter's ends: 70% and 80%.
        assert_eq!(refresh_in(1_000, 1_400, 5, point, 0.0), SECS(280));
        assert_eq!(refresh_in(1_000, 1_400, 5, point, 1.0), SECS(320));
    }

    #[test]
    fn jittered_renewal_stays_within_five_percent_of_three_quarters() {
        let point = RenewPoint::default();
        for i in 0..=100 {
            let r = refresh_in(0, 600, 5, point, f64::from(i) / 100.0);
            assert!((SECS(420)..=SECS(480)).contains(&r), "{r:?}");
        }
    }

    #[test]
    fn renewal_comes_before_the_token_stops_being_served() {
        let late = RenewPoint { fraction: 1.0, jitter: 0.0 };
        // Served until 1_095 (margin 5): renewed at 1_094 at the latest.
        assert_eq!(refresh_in(1_000, 1_100, 5, late, 0.5), SECS(94));
        let past = RenewPoint { fraction: 2.0, jitter: 0.5 };
        assert_eq!(refresh_in(1_000, 1_100, 5, past, 1.0), SECS(94));
    }

    #[test]
    fn tokens_due_within_half_their_window_join_a_batch_renewal() {
        // Renewed at 225 of a 300 s life: the window is 75 s, half is 37.
        assert!(due_soon(225, 225, 300));
        assert!(due_soon(188, 225, 300));
        assert!(!due_soon(187, 225, 300));
        assert!(due_soon(0, 0, 0), "degenerate: due");
        assert!(due_soon(u64::MAX, u64::MAX, u64::MAX));
    }

    #[test]
    fn degenerate_inputs_renew_at_once_and_never_panic() {
        let point = RenewPoint::default();
        assert_eq!(refresh_in(1_000, 1_000, 0, point, 0.5), Duration::ZERO, "no life");
        assert_eq!(refresh_in(1_000, 900, 5, point, 0.5), Duration::ZERO, "expired at issue");
        assert_eq!(refresh_in(0, 100, u64::MAX, point, 0.5), Duration::ZERO, "margin beyond the life");
        assert_eq!(refresh_in(0, 100, 5, point, f64::NAN), Duration::ZERO);
        let early = RenewPoint { fraction: -1.0, jitter: 0.0 };
        assert_eq!(refresh_in(0, 100, 5, early, 0.5), Duration::ZERO);
        assert!(refresh_in(0, u64::MAX, 0, point, 1.0) < SECS(u64::MAX));
    }
}
