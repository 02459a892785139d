//! Back-off for failed password logins, per username.
//!
//! Each attempt on a username counts as a failure until it succeeds (so
//! guesses sent in parallel count at once, not when their checks finish).
//! The first [`ThrottleConfig::free`] attempts go through; each one after
//! that must wait `2^(k-1)` seconds after the previous attempt (k = attempts
//! beyond the free ones), up to [`ThrottleConfig::max_backoff_secs`]. A
//! waiting username is refused without a password check, so it costs no
//! argon2 time. A success forgets the username, and so does a quiet window
//! ([`ThrottleConfig::window_secs`] without an attempt): a guesser who keeps
//! going stays at the longest back-off.
//!
//! - **Nothing is revealed.** Unknown usernames are tracked and throttled
//!   exactly like real ones, before the directory is consulted.
//! - **Users are independent.** Each username has its own entry; a throttled
//!   one never delays another.
//! - **Bounded memory.** Entries are keyed by the username's SHA-256 (fixed
//!   size, whatever the name) and at most [`ThrottleConfig::max_entries`]
//!   are kept: when full, entries whose window is over go first, then those
//!   not backing off, oldest first, then the ones whose back-off ends
//!   soonest.
//!
//! Times are whole seconds from the injected clock.

use std::collections::HashMap;
use std::sync::Mutex;

use aws_lc_rs::digest;

use crate::config::LimitsConfig;

/// Back-off settings; see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Attempts allowed in a window before back-off starts.
    pub free: u32,
    /// Seconds without an attempt after which a username's failures are
    /// forgotten.
    pub window_secs: u64,
    /// The longest back-off, in seconds.
    pub max_backoff_secs: u64,
    /// Most usernames tracked.
    pub max_entries: usize,
}

impl From<&LimitsConfig> for ThrottleConfig {
    fn from(l: &LimitsConfig) -> Self {
        Self {
            free: l.login_backoff_after,
            window_secs: l.login_backoff_window_secs,
            max_backoff_secs: l.login_backoff_max_secs,
            max_entries: l.login_backoff_entries,
        }
    }
}

/// A username must wait before its next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    /// Seconds until an attempt is accepted again.
    pub retry_after_secs: u64,
}

/// An attempt admitted by [`LoginThrottle::begin`]; hand it back to
/// [`LoginThrottle::succeeded`] or [`LoginThrottle::not_checked`].
#[derive(Debug)]
pub struct Attempt {
    key: [u8; 32],
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Attempts not (yet) followed by a success.
    failures: u32,
    /// When the last attempt was admitted.
    last: u64,
    /// No attempt before this time.
    blocked_until: u64,
}

/// Failed-login back-off per username; see the [module docs](self).
#[derive(Debug)]
pub struct LoginThrottle {
    config: ThrottleConfig,
    entries: Mutex<HashMap<[u8; 32], Entry>>,
}

fn key_of(username: &str) -> [u8; 32] {
    let mut key = [0u8; 32];
    key.copy_from_slice(digest::digest(&digest::SHA256, username.as_bytes()).as_ref());
    key
}

impl LoginThrottle {
    /// An empty table.
    pub fn new(config: ThrottleConfig) -> Self {
        Self { config, entries: Mutex::new(HashMap::new()) }
    }

    /// The back-off before the attempt after `failures` failed ones.
    fn backoff(&self, failures: u32) -> u64 {
        match failures.checked_sub(self.config.free) {
            None => 0,
            Some(beyond) => {
                let doubled = 1u64.checked_shl(beyond).unwrap_or(u64::MAX);
                doubled.min(self.config.max_backoff_secs)
            }
        }
    }

    /// Admits an attempt on `username` at `now` (counting it as a failure
    /// until [`LoginThrottle::succeeded`]), or refuses it while the username
    /// backs off.
    pub fn begin(&self, username: &str, now: u64) -> Result<Attempt, Throttled> {
        let key = key_of(username);
        let Ok(mut entries) = self.entries.lock() else {
            // A poisoned table throttles nobody rather than everybody.
            return Ok(Attempt { key });
        };
        if let Some(e) = entries.get_mut(&key) {
            if now < e.blocked_until {
                return Err(Throttled { retry_after_secs: e.blocked_until - now });
            }
            if now.saturating_sub(e.last) >= self.config.window_secs {
                e.failures = 0;
            }
            e.failures = e.failures.saturating_add(1);
            e.last = now;
            e.blocked_until = now.saturating_add(self.backoff(e.failures));
            return Ok(Attempt { key });
        }
        if entries.len() >= self.config.max_entries {
            self.evict(&mut entries, now);
        }
        entries.insert(key, Entry { failures: 1, last: now, blocked_until: now.saturating_add(self.backoff(1)) });
        Ok(Attempt { key })
    }

    /// The attempt succeeded: the username starts afresh.
    pub fn succeeded(&self, attempt: Attempt) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(&attempt.key);
        }
    }

    /// The attempt was never checked (the server was too busy): it does
    /// not count.
    pub fn not_checked(&self, attempt: Attempt) {
        let Ok(mut entries) = self.entries.lock() else { return };
        let Some(e) = entries.get_mut(&attempt.key) else { return };
        e.failures = e.failures.saturating_sub(1);
        if e.failures == 0 {
            entries.remove(&attempt.key);
        } else {
            e.blocked_until = e.last.saturating_add(self.backoff(e.failures));
        }
    }

    /// Usernames tracked now.
    pub fn len(&self) -> usize {
        self.entries.lock().map_or(0, |e| e.len())
    }

    /// Whether no username is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes room for at least one entry, and for an eighth of the table
    /// when it has to evict live entries (so a full table is swept rarely).
    fn evict(&self, entries: &mut HashMap<[u8; 32], Entry>, now: u64) {
        let window = self.config.window_secs;
        entries.retain(|_, e| now < e.blocked_until || now.saturating_sub(e.last) < window);
        if entries.len() < self.config.max_entries {
            return;
        }
        let drop = (self.config.max_entries / 8).max(1);
        // Rank: not backing off before backing off; then the oldest attempt,
        // or the back-off that ends soonest.
        let mut ranked: Vec<(bool, u64, [u8; 32])> = entries
            .iter()
            .map(|(k, e)| {
                let blocked = now < e.blocked_until;
                (blocked, if blocked { e.blocked_until } else { e.last }, *k)
            })
            .collect();
        if drop < ranked.len() {
            ranked.select_nth_unstable(drop);
        }
        for (_, _, k) in ranked.iter().take(drop) {
            entries.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(free: u32, max_entries: usize) -> LoginThrottle {
        LoginThrottle::new(ThrottleConfig { free, window_secs: 900, max_backoff_secs: 60, max_entries })
    }

    /// Fails `n` attempts at `now`, each admitted.
    fn fail(t: &LoginThrottle, user: &str, now: u64, n: u32) {
        for _ in 0..n {
            t.begin(user, now).unwrap();
        }
    }

    #[test]
    fn free_attempts_then_a_doubling_back_off_up_to_the_cap() {
        let t = throttle(3, 100);
        fail(&t, "alice", 1000, 3);
        assert_eq!(t.begin("alice", 1000).unwrap_err(), Throttled { retry_after_secs: 1 });
        let mut now = 1001;
        for expected in [2, 4, 8, 16, 32, 60, 60] {
            t.begin("alice", now).unwrap();
            assert_eq!(t.begin("alice", now).unwrap_err().retry_after_secs, expected);
            assert!(t.begin("alice", now + expected - 1).is_err());
            now += expected;
        }
    }

    #[test]
    fn unknown_and_known_usernames_throttle_alike_and_independently() {
        let t = throttle(2, 100);
        fail(&t, "alice", 10, 2);
        fail(&t, "no-such-user", 10, 2);
        let a = t.begin("alice", 10).unwrap_err();
        let m = t.begin("no-such-user", 10).unwrap_err();
        assert_eq!(a, m);
        // bob is not delayed by either.
        t.begin("bob", 10).unwrap();
        t.begin("bob", 10).unwrap();
    }

    #[test]
    fn a_success_forgets_the_username() {
        let t = throttle(2, 100);
        t.begin("alice", 10).unwrap();
        let ok = t.begin("alice", 10).unwrap();
        t.succeeded(ok);
        assert!(t.is_empty());
        fail(&t, "alice", 10, 2);
    }

    #[test]
    fn failures_are_forgotten_after_a_quiet_window() {
        let t = throttle(2, 100);
        fail(&t, "alice", 10, 2);
        assert!(t.begin("alice", 10).is_err());
        // After the back-off, the count goes on.
        t.begin("alice", 11).unwrap();
        assert_eq!(t.begin("alice", 11).unwrap_err().retry_after_secs, 2);
        // Less than a window since the last attempt: it still goes on.
        t.begin("alice", 11 + 899).unwrap();
        assert_eq!(t.begin("alice", 11 + 899).unwrap_err().retry_after_secs, 4);
        // A whole window of quiet: it starts afresh.
        fail(&t, "alice", 11 + 899 + 900, 2);
    }

    #[test]
    fn an_unchecked_attempt_does_not_count() {
        let t = throttle(2, 100);
        let a = t.begin("alice", 10).unwrap();
        let b = t.begin("alice", 10).unwrap();
        t.not_checked(b);
        t.not_checked(a);
        assert!(t.is_empty());
        fail(&t, "alice", 10, 2);
    }

    #[test]
    fn the_table_is_bounded_and_keeps_those_backing_off() {
        let t = throttle(1, 64);
        // alice backs off for a long time.
        for now in [0, 1, 3, 7, 15, 31] {
            t.begin("alice", now).unwrap();
        }
        assert!(t.begin("alice", 31).is_err());
        // A flood of other names, each tried once (none backing off yet for
        // long, the oldest evicted first).
        for i in 0..10_000u64 {
            let _ = t.begin(&format!("user-{i}"), 32 + i / 1000);
            assert!(t.len() <= 64);
        }
        assert!(t.begin("alice", 42).is_err(), "a name backing off was forgotten");
    }

    #[test]
    fn names_of_any_length_cost_one_fixed_entry() {
        let t = throttle(1, 4);
        let long = "x".repeat(8 * 1024);
        t.begin(&long, 0).unwrap();
        assert!(t.begin(&long, 0).is_err());
        assert_eq!(t.len(), 1);
    }
}
