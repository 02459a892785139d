//! Time, injected: the token source reads "now" only through [`Clock`] (for
//! token lifetimes and for back-off alike), so a test can move time forward
//! instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of the current time in Unix seconds (and milliseconds).
pub trait Clock: Send + Sync + 'static {
    /// Seconds since the Unix epoch.
    fn now_unix(&self) -> u64;

    /// Milliseconds since the Unix epoch, for delays shorter than a second
    /// (retry back-off). Defaults to [`now_unix`](Self::now_unix) in
    /// milliseconds: a clock that counts whole seconds moves back-off in
    /// whole seconds too.
    fn now_millis(&self) -> u64 {
        self.now_unix().saturating_mul(1000)
    }
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    }

    fn now_millis(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A clock a test sets and advances by hand. Clones share one reading.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock reading `now` (Unix seconds).
    pub fn new(now: u64) -> Self {
        Self(Arc::new(AtomicU64::new(now.saturating_mul(1000))))
    }

    /// Moves the clock forward by `secs`.
    pub fn advance(&self, secs: u64) {
        self.advance_millis(secs.saturating_mul(1000));
    }

    /// Moves the clock forward by `millis` milliseconds.
    pub fn advance_millis(&self, millis: u64) {
        self.0.fetch_add(millis, Ordering::SeqCst);
    }

    /// Sets the clock (Unix seconds).
    pub fn set(&self, now: u64) {
        self.0.store(now.saturating_mul(1000), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_unix(&self) -> u64 {
        self.0.load(Ordering::SeqCst) / 1000
    }

    fn now_millis(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now_unix(&self) -> u64 {
        (**self).now_unix()
    }

    fn now_millis(&self) -> u64 {
        (**self).now_millis()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_clones_share_one_reading() {
        let a = ManualClock::new(100);
        let b = a.clone();
        a.advance(5);
        assert_eq!(b.now_unix(), 105);
        b.set(7);
        assert_eq!(a.now_unix(), 7);
    }

    #[test]
    fn manual_clock_moves_in_milliseconds_and_reads_whole_seconds() {
        let c = ManualClock::new(100);
        assert_eq!(c.now_millis(), 100_000);
        c.advance_millis(999);
        assert_eq!((c.now_unix(), c.now_millis()), (100, 100_999));
        c.advance_millis(1);
        assert_eq!(c.now_unix(), 101);
        let shared: Arc<dyn Clock> = Arc::new(c.clone());
        assert_eq!(shared.now_millis(), 101_000);
    }

    #[test]
    fn a_seconds_only_clock_reads_whole_seconds_in_milliseconds() {
        struct Seconds;
        impl Clock for Seconds {
            fn now_unix(&self) -> u64 {
                42
            }
        }
        assert_eq!(Seconds.now_millis(), 42_000);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now_unix() > 1_577_836_800);
        let (s, ms) = (SystemClock.now_unix(), SystemClock.now_millis());
        assert!(ms / 1000 >= s && ms / 1000 <= s + 1, "{s} s vs {ms} ms");
    }
}
