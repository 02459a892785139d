//! The cache: one slot per (audience) for the service's own tokens and per
//! (audience, user token) for delegated ones. A slot holds the current token
//! (read lock-free on the hot path), a flight lock (one exchange at a time)
//! and its retry state.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use aws_lc_rs::digest;
use http::HeaderValue;

use super::Inner;
use super::error::TokenError;
use crate::backoff::Backoff;

/// An access token from the source. Cheap to clone. `Debug` does not print
/// the token.
#[derive(Clone)]
pub struct AccessToken(pub(super) Arc<Cached>);

impl AccessToken {
    /// The compact JWS.
    pub fn as_str(&self) -> &str {
        &self.0.token
    }

    /// `Bearer <token>` as a (sensitive) header value.
    pub fn bearer(&self) -> &HeaderValue {
        &self.0.bearer
    }

    /// When the token stops being served (Unix seconds, source clock).
    pub fn expires_at(&self) -> u64 {
        self.0.expires_at
    }

    /// The scopes the auth service granted.
    pub fn scope(&self) -> &[String] {
        &self.0.scope
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken").field("expires_at", &self.0.expires_at).finish_non_exhaustive()
    }
}

/// A token as cached, with the times (Unix seconds, source clock) that
/// govern it.
pub(super) struct Cached {
    pub(super) token: Box<str>,
    pub(super) bearer: HeaderValue,
    /// Served while `now < expires_at - margin`.
    pub(super) expires_at: u64,
    pub(super) margin: u64,
    pub(super) renew_at: u64,
    pub(super) scope: Vec<String>,
    /// RFC 8705: the thumbprint (`cnf.x5t#S256`) of the client certificate
    /// the token is bound to, if it is bound.
    pub(super) cnf: Option<Box<str>>,
}

impl Cached {
    pub(super) fn valid(&self, now: u64) -> bool {
        now.saturating_add(self.margin) < self.expires_at
    }

    /// Whether the token may go out over a connection made with the client
    /// certificate of thumbprint `certificate` (`None`: not known, any). An
    /// unbound token goes anywhere; a bound one only with its certificate.
    pub(super) fn usable_with(&self, certificate: Option<&str>) -> bool {
        match (&self.cnf, certificate) {
            (Some(bound), Some(cert)) => **bound == *cert,
            _ => true,
        }
    }
}

/// A slot's retry state after failed exchanges, on the source clock in
/// milliseconds.
pub(super) struct Retry {
    backoff: Backoff,
    retry_at_ms: Option<u64>,
    last_error: Option<TokenError>,
}

impl Retry {
    pub(super) fn new(backoff: Backoff) -> Self {
        Self { backoff, retry_at_ms: None, last_error: None }
    }

    /// The last failure, until a success.
    pub(super) fn last_error(&self) -> Option<&TokenError> {
        self.last_error.as_ref()
    }

    /// The last failure, while its back-off has not elapsed at `now_ms`.
    pub(super) fn pending(&self, now_ms: u64) -> Option<&TokenError> {
        match (self.retry_at_ms, &self.last_error) {
            (Some(at), Some(e)) if now_ms < at => Some(e),
            _ => None,
        }
    }

    /// Whether a new attempt may start at `now_ms`.
    pub(super) fn ready(&self, now_ms: u64) -> bool {
        self.retry_at_ms.is_none_or(|at| now_ms >= at)
    }

    pub(super) fn succeeded(&mut self) {
        self.backoff.reset();
        self.retry_at_ms = None;
        self.last_error = None;
    }

    /// Records a failure at `now_ms`; returns the delay before the next
    /// attempt.
    pub(super) fn failed(&mut self, now_ms: u64, error: TokenError) -> Duration {
        let delay = self.backoff.next_delay();
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.retry_at_ms = Some(now_ms.saturating_add(delay_ms));
        self.last_error = Some(error);
        delay
    }
}

pub(super) struct Slot {
    pub(super) audience: Box<str>,
    pub(super) current: ArcSwapOption<Cached>,
    /// The token a certificate rotation replaced, served only to channels
    /// still on the certificate it is bound to, until they are retired.
    pub(super) previous: ArcSwapOption<Cached>,
    pub(super) flight: tokio::sync::Mutex<()>,
    retry: Mutex<Retry>,
    /// Last time (source clock) a caller asked for this slot.
    pub(super) last_used: AtomicU64,
    pub(super) renewing: AtomicU32,
}

impl Slot {
    pub(super) fn new(audience: &str, now: u64, backoff: &Backoff) -> Self {
        Self {
            audience: audience.into(),
            current: ArcSwapOption::empty(),
            previous: ArcSwapOption::empty(),
            flight: tokio::sync::Mutex::new(()),
            retry: Mutex::new(Retry::new(backoff.clone())),
            last_used: AtomicU64::new(now),
            renewing: AtomicU32::new(0),
        }
    }

    /// The cached token if it is valid at `now` and usable over a
    /// connection with the client certificate of thumbprint `certificate`
    /// ([`Cached::usable_with`]); marks the slot used. The token a rotation
    /// replaced is served only to a channel still on its certificate.
    #[inline]
    pub(super) fn hit(&self, now: u64, certificate: Option<&str>) -> Option<AccessToken> {
        let guard = self.current.load();
        let cached = match guard.as_ref() {
            Some(c) if c.valid(now) && c.usable_with(certificate) => Arc::clone(c),
            _ => {
                let previous = self.previous.load();
                let p = previous
                    .as_ref()
                    .filter(|p| certificate.is_some() && p.valid(now) && p.usable_with(certificate))?;
                Arc::clone(p)
            }
        };
        if self.last_used.load(Ordering::Relaxed) != now {
            self.last_used.store(now, Ordering::Relaxed);
        }
        Some(AccessToken(cached))
    }

    /// Whether the slot holds a token valid at `now`.
    pub(super) fn holds_valid(&self, now: u64) -> bool {
        self.current.load().as_ref().is_some_and(|c| c.valid(now))
    }

    pub(super) fn lock_retry(&self) -> MutexGuard<'_, Retry> {
        self.retry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The cache key of a delegated token: the audience and the SHA-256 of the
/// user's token (the token itself is not kept as a key).
pub(super) type SubjectKey = (Box<str>, [u8; 32]);

pub(super) fn subject_digest(token: &str) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl Inner {
    /// The slot for `audience` (and `subject`), created if missing; `None`
    /// when the delegated map is full of valid tokens.
    pub(super) fn slot_for(&self, audience: &str, subject: Option<&SubjectKey>) -> Option<Arc<Slot>> {
        let now = self.clock.now_unix();
        let new_slot = || Arc::new(Slot::new(audience, now, &self.cfg.backoff));
        match subject {
            None => {
                if let Some(s) = self.service.read().unwrap_or_else(|e| e.into_inner()).get(audience) {
                    return Some(Arc::clone(s));
                }
                let mut map = self.service.write().unwrap_or_else(|e| e.into_inner());
                Some(Arc::clone(map.entry(audience.into()).or_insert_with(new_slot)))
            }
            Some(key) => {
                if let Some(s) = self.delegated.read().unwrap_or_else(|e| e.into_inner()).get(key) {
                    return Some(Arc::clone(s));
                }
                let mut map = self.delegated.write().unwrap_or_else(|e| e.into_inner());
                if map.len() >= self.cfg.max_delegated {
                    map.retain(|_, s| s.holds_valid(now));
                    if map.len() >= self.cfg.max_delegated {
                        return None;
                    }
                }
                Some(Arc::clone(map.entry(key.clone()).or_insert_with(new_slot)))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn expired_tokens_are_not_valid() {
        let c = Cached {
            token: "t".into(),
            bearer: HeaderValue::from_static("Bearer t"),
            expires_at: 100,
            margin: 5,
            renew_at: 75,
            scope: vec![],
            cnf: Some("thumb-a".into()),
        };
        assert!(c.valid(94));
        assert!(!c.valid(95));
        assert!(!c.valid(200));
    }

    #[test]
    fn a_bound_token_goes_out_only_with_its_certificate() {
        let bound = |cnf: Option<&str>| Cached {
            token: "t".into(),
            bearer: HeaderValue::from_static("Bearer t"),
            expires_at: 100,
            margin: 5,
            renew_at: 75,
            scope: vec![],
            cnf: cnf.map(Into::into),
        };
        let slot = Slot::new("inventory", 0, &Backoff::new(Duration::from_millis(1), Duration::from_millis(1)));
        slot.current.store(Some(Arc::new(bound(Some("new")))));
        slot.previous.store(Some(Arc::new(bound(Some("old")))));
        assert!(slot.hit(10, Some("new")).is_some_and(|t| t.0.cnf.as_deref() == Some("new")));
        assert!(
            slot.hit(10, Some("old")).is_some_and(|t| t.0.cnf.as_deref() == Some("old")),
            "a channel still on the old certificate"
        );
        assert!(slot.hit(10, Some("other")).is_none());
        assert!(
            slot.hit(10, None).is_some_and(|t| t.0.cnf.as_deref() == Some("new")),
            "certificate unknown: the current token"
        );
        slot.current.store(Some(Arc::new(bound(None))));
        assert!(slot.hit(10, Some("other")).is_some(), "an unbound token goes anywhere");
    }

    #[test]
    fn retry_waits_out_the_back_off_on_the_given_clock_and_resets_on_success() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut r = Retry::new(backoff);
        assert!(r.ready(0) && r.pending(0).is_none());
        let err = TokenError::Unavailable { audience: "a".into(), reason: "Unavailable".into() };
        assert_eq!(r.failed(10_000, err.clone()), Duration::from_millis(100));
        assert_eq!(r.pending(10_099), Some(&err));
        assert!(!r.ready(10_099));
        assert!(r.ready(10_100) && r.pending(10_100).is_none());
        assert_eq!(r.failed(10_100, err.clone()), Duration::from_millis(200), "doubles");
        r.succeeded();
        assert!(r.ready(10_101) && r.pending(10_101).is_none());
        assert_eq!(r.failed(20_000, err), Duration::from_millis(100), "back to the base");
    }

    #[test]
    fn subject_keys_are_digests_of_the_user_token() {
        assert_eq!(subject_digest("a"), subject_digest("a"));
        assert_ne!(subject_digest("a"), subject_digest("b"));
    }
}
