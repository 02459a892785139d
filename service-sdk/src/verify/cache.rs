//! The verified-token cache: claims of tokens whose signature and header
//! were already checked, keyed by the SHA-256 digest of the token (the
//! token itself is never stored). Entries expire with the token; a
//! revocation evicts them.
//!
//! A hit skips only the signature: the claim checks (times, issuer,
//! audience), the certificate binding and the revocation check still run
//! on every request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use moka::sync::Cache;

use super::RevokedKind;
use crate::claims::Claims;

/// The cache key: SHA-256 of the compact token.
pub(crate) type TokenDigest = [u8; 32];

/// Digests a token.
pub(crate) fn token_digest(token: &str) -> TokenDigest {
    let d = digest::digest(&digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[derive(Clone)]
struct Entry {
    claims: Arc<Claims>,
    ttl: Duration,
}

struct UntilExpiry;

impl moka::Expiry<TokenDigest, Entry> for UntilExpiry {
    fn expire_after_create(&self, _key: &TokenDigest, value: &Entry, _now: Instant) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// A bounded map from token digest to verified claims.
#[derive(Clone)]
pub(crate) struct TokenCache {
    inner: Cache<TokenDigest, Entry>,
}

impl TokenCache {
    /// A cache of at most `capacity` tokens.
    pub(crate) fn new(capacity: u64) -> Self {
        let inner =
            Cache::builder().max_capacity(capacity).expire_after(UntilExpiry).support_invalidation_closures().build();
        Self { inner }
    }

    pub(crate) fn get(&self, key: &TokenDigest) -> Option<Arc<Claims>> {
        self.inner.get(key).map(|e| e.claims)
    }

    /// Holds `claims` until `exp` plus `leeway` (measured from `now`).
    pub(crate) fn insert(&self, key: TokenDigest, claims: Arc<Claims>, now: u64, leeway: u64) {
        let secs = claims.exp.saturating_add(leeway).saturating_sub(now);
        if secs == 0 {
            return;
        }
        self.inner.insert(key, Entry { claims, ttl: Duration::from_secs(secs) });
    }

    /// Evicts every entry of a revoked `jti` or `sid`.
    pub(crate) fn evict(&self, kind: RevokedKind, id: String) {
        let result = match kind {
            RevokedKind::Jti => self.inner.invalidate_entries_if(move |_, e| e.claims.jti == id),
            RevokedKind::Sid => {
                self.inner.invalidate_entries_if(move |_, e| e.claims.sid.as_deref() == Some(id.as_str()))
            }
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "verified-token cache eviction failed");
        }
    }

    /// Drops every entry.
    pub(crate) fn clear(&self) {
        self.inner.invalidate_all();
    }

    /// Approximate number of entries (after pending maintenance).
    pub(crate) fn len(&self) -> u64 {
        self.inner.run_pending_tasks();
        self.inner.entry_count()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::claims::Audience;

    fn claims(jti: &str, sid: &str, exp: u64) -> Arc<Claims> {
        Arc::new(Claims {
            iss: "i".into(),
            sub: "u".into(),
            aud: Audience::One("a".into()),
            exp,
            nbf: 0,
            iat: 0,
            jti: jti.into(),
            sid: Some(sid.into()),
            client_id: "c".into(),
            role: None,
            perms: vec![],
            act: None,
            cnf: None,
        })
    }

    #[test]
    fn digests_differ_per_token() {
        assert_ne!(token_digest("a.b.c"), token_digest("a.b.d"));
        assert_eq!(token_digest("a.b.c"), token_digest("a.b.c"));
    }

    #[test]
    fn revocation_evicts_by_jti_and_by_sid() {
        let cache = TokenCache::new(100);
        cache.insert(token_digest("t1"), claims("j1", "s1", 2_000), 1_000, 30);
        cache.insert(token_digest("t2"), claims("j2", "s2", 2_000), 1_000, 30);
        cache.insert(token_digest("t3"), claims("j3", "s2", 2_000), 1_000, 30);
        assert_eq!(cache.len(), 3);
        cache.evict(RevokedKind::Jti, "j1".into());
        cache.evict(RevokedKind::Sid, "s2".into());
        assert!(cache.get(&token_digest("t1")).is_none());
        assert!(cache.get(&token_digest("t2")).is_none());
        assert!(cache.get(&token_digest("t3")).is_none());
    }

    #[test]
    fn expired_tokens_are_not_cached() {
        let cache = TokenCache::new(100);
        cache.insert(token_digest("t"), claims("j", "s", 900), 1_000, 30);
        assert!(cache.get(&token_digest("t")).is_none());
        cache.insert(token_digest("t"), claims("j", "s", 990), 1_000, 30);
        assert!(cache.get(&token_digest("t")).is_some(), "still inside the leeway");
    }

    #[test]
    fn capacity_bounds_the_cache() {
        let cache = TokenCache::new(10);
        for i in 0..100 {
            cache.insert(token_digest(&format!("t{i}")), claims(&format!("j{i}"), "s", 2_000), 1_000, 30);
        }
        assert!(cache.len() <= 10);
    }
}
